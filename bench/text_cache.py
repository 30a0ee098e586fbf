"""Text cache bench: bytes per sample of latent caches that refer to one shared text cache vs today's
caches with the text inline, at the 29x480p and 93x480p latent sizes with ~150-token mT5-XXL captions.

    python bench/text_cache.py [--samples 16] [--dir /tmp/osp-bench-text]

The same captions are cached for both geometries: inline, each geometry stores every caption again;
shared, the text cache stores each once and the latent caches only a key. Random data (sizes are
what matter). Target: both geometries shared / inline <= 0.8 (the text is stored once, not twice).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from osp.common import shards as S
from osp.common.config import TEXT_DIM_MT5_XXL, TEXT_MAX_LENGTH

GEOMETRIES = {"29x480p": (8, 8, 60, 80), "93x480p": (8, 24, 60, 80)}  # posterior moments [8, T, H, W]
TEXT_LEN = 150
TEXT_ID = "bench-mt5-xxl-bf16"


def _captions(n: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            f"caption {j}: a red ball bouncing on a green field",
            torch.randn(TEXT_LEN + j % 21 - 10, TEXT_DIM_MT5_XXL, generator=g).to(torch.bfloat16),
        )
        for j in range(n)
    ]


def _tar_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("shard-*.tar"))


def write_inline(out: Path, latent: tuple, caps) -> int:
    g = torch.Generator().manual_seed(1)
    with S.ShardWriter(out, 0) as w:
        for j, (c, text) in enumerate(caps):
            w.write(f"s{j:06d}", torch.randn(latent, generator=g), text, {"caption": c})
        w.publish()
    return _tar_bytes(out)


def write_text_cache(out: Path, caps) -> int:
    with S.TextShardWriter(out, 0) as w:
        for c, text in caps:
            w.write(S.text_key(c, TEXT_ID, TEXT_MAX_LENGTH), text, {"caption_clean": c})
        w.publish()
    return _tar_bytes(out)


def write_by_reference(out: Path, latent: tuple, caps) -> int:
    g = torch.Generator().manual_seed(1)
    with S.ShardWriter(out, 0) as w:
        for j, (c, text) in enumerate(caps):
            key = S.text_key(c, TEXT_ID, TEXT_MAX_LENGTH)
            meta = {"caption": c, S.TEXT_KEY_FIELD: key}
            w.write(f"s{j:06d}", torch.randn(latent, generator=g), None, meta, text_len=int(text.shape[0]))
        w.publish()
    return _tar_bytes(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="osp-bench-text-"))
    shutil.rmtree(root, ignore_errors=True)
    n, caps = a.samples, _captions(a.samples)
    text = write_text_cache(root / "text", caps) / n
    mib = 2**20
    print(f"{n} samples, captions ~{TEXT_LEN} tokens x {TEXT_DIM_MT5_XXL} bf16, moments float16")
    print(f"text cache: {text / mib:.3f} MiB per caption (stored once for every geometry)")
    latents = {}
    for name, latent in GEOMETRIES.items():
        inline = write_inline(root / f"inline-{name}", latent, caps) / n
        latents[name] = write_by_reference(root / f"ref-{name}", latent, caps) / n
        one = latents[name] + text
        two = latents[name] + text / len(GEOMETRIES)
        print(
            f"{name}: inline {inline / mib:.3f} MiB/sample; latent {latents[name] / mib:.3f} MiB + shared text: "
            f"{one / mib:.3f} MiB with one geometry (ratio {one / inline:.3f}), {two / mib:.3f} MiB with "
            f"{len(GEOMETRIES)} geometries sharing it (ratio {two / inline:.3f})"
        )
    total_inline = sum(write_inline(root / f"x-{k}", v, caps) for k, v in GEOMETRIES.items()) / n
    total_shared = sum(latents.values()) + text
    print(
        f"both geometries: inline {total_inline / mib:.3f} MiB vs shared {total_shared / mib:.3f} MiB per clip "
        f"(ratio {total_shared / total_inline:.3f})"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
