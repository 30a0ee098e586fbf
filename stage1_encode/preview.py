"""`osp shards preview`: decode one cached latent back to an mp4 (an audit of the feature cache).

The stored latent is the VAE posterior (moments, unscaled); the preview decodes its mode (the mean),
so it shows what the cache holds without sampling noise. The VAE used must be the one that encoded
the shards: its weight sha256 is checked against the manifest and a mismatch is refused unless
`force` (then the video is labelled as decoded by a different VAE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from osp.common import shards as S
from osp.common.config import TILING_SAMPLE
from osp.common.errors import OspError


class PreviewError(OspError, ValueError):
    """A preview request that cannot be served (unknown key, missing VAE)."""


def find_key(index: S.ShardIndex, key: str, where: Path) -> int:
    keys = index.columns["key"]
    hits = [i for i, k in enumerate(keys) if str(k) == key]
    if not hits:
        near = [str(k) for k in keys if key in str(k)][:5]
        hint = f"; did you mean {', '.join(near)}" if near else "; list keys with `osp shards inspect`"
        raise PreviewError(f"{where}: no sample with key {key!r}{hint}")
    return hits[0]


@torch.no_grad()
def preview(
    shard_dir: str | Path,
    key: str,
    out: str | Path,
    vae: str | Path | None = None,
    device: str = "auto",
    tiling: bool = True,
    force: bool = False,
) -> dict:
    """Decode sample `key` of `shard_dir` with the VAE and write `out` (mp4). Returns a summary."""
    from osp.common.device import pick_device
    from osp.common.models.vae import DiagonalGaussian, load_vae, vae_identity
    from osp.common.sampling import to_uint8, write_mp4

    shard_dir = Path(shard_dir)
    manifest = S.read_manifest(shard_dir)
    want = manifest.get("vae", {})
    if vae is None:
        vae = want.get("path")
        if not vae or not Path(vae).is_dir():
            raise PreviewError(f"{shard_dir}/manifest.json names no usable VAE folder ({vae}); pass --vae DIR")
    ident = vae_identity(vae)
    mismatch = ident["weights_sha256"] != want.get("weights_sha256")
    if mismatch and not force:
        raise PreviewError(
            f"{vae}: weights sha256 {ident['weights_sha256'][:12]} differ from the VAE that encoded {shard_dir} "
            f"({str(want.get('weights_sha256'))[:12]}); pass that VAE with --vae, or --force to decode anyway"
        )
    index = S.ShardIndex.open(shard_dir)
    sample = S.read_sample(shard_dir, index, find_key(index, key, shard_dir))
    latent = sample.latent.float()[None]  # [1, 8 | 4, t, h, w]
    dev = pick_device(device).torch_device()
    model = load_vae(vae).to(dev).eval()
    z = DiagonalGaussian(latent).mode() if latent.shape[1] == 8 else latent  # [1, 4, t, h, w], unscaled
    video = model.decode(z.to(dev), tiling=TILING_SAMPLE if tiling else None)  # [1, 3, T, H, W]
    frames = to_uint8(video[0])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fps = int(manifest.get("geometry", {}).get("fps", 24))
    write_mp4(out, frames, fps=fps)
    return {
        "key": key,
        "out": str(out),
        "frames": int(frames.shape[0]),
        "size": list(frames.shape[1:3]),
        "latent": list(sample.latent.shape),
        "vae_mismatch": mismatch,
        "caption": sample.meta.get("caption"),
    }
