"""Helpers of tests/test_train.py: tiny shard directories written with the real ShardWriter, free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from osp.common import shards as S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(
    out: str | Path,
    n: int = 8,
    *,
    per_shard: int = 4,
    latent: tuple[int, int, int] | None = None,  # default: the tiny preset's latent T x H x W
    text_dim: int = 64,
    seed: int = 0,
    nan_keys: tuple[str, ...] = (),
    extra_shapes: dict[str, tuple[int, int, int]] | None = None,
    prefix: str = "clip",
) -> Path:
    """n samples of random posterior moments [8, T, H, W] (fp16) and unpadded text [L, D] (bf16) in
    shards of `per_shard`, plus manifest, uncond and index. `nan_keys` get an Inf in their mean."""
    out = Path(out)
    if latent is None:
        from osp.common.config import get_preset

        latent = get_preset("tiny").latent_shape[1:]
    g = torch.Generator().manual_seed(seed)
    keys = [f"{prefix}{i:04d}" for i in range(n)]
    for sid in range(0, n, per_shard):
        w = S.ShardWriter(out, sid // per_shard)
        for key in keys[sid : sid + per_shard]:
            shape = (extra_shapes or {}).get(key, latent)
            mean = torch.randn((4,) + shape, generator=g)
            logvar = torch.full((4,) + shape, -4.0) + 0.1 * torch.randn((4,) + shape, generator=g)
            if key in nan_keys:
                mean[0, 0, 0, 0] = float("inf")
            L = int(torch.randint(3, 11, (1,), generator=g))
            text = torch.randn(L, text_dim, generator=g).to(torch.bfloat16)
            w.write(key, torch.cat([mean, logvar]), text, {"caption": f"caption of {key}"})
        w.publish()
    S.write_manifest(out, {"preset": "tiny", "latent_dtype": "float16", "text_dtype": "bfloat16"})
    S.write_uncond(out, torch.randn(1, text_dim, generator=g).to(torch.bfloat16))
    S.merge_index(out)
    return out


def corrupt_sample(out: str | Path, key: str) -> None:
    """Flip one byte inside the safetensors member of `key` (its checksum then fails)."""
    index = S.ShardIndex.open(out)
    i = list(index.key).index(key)
    r = index.row(i)
    path = S.shard_path(out, r.shard)
    data = bytearray(path.read_bytes())
    pos = r.st_offset + r.st_size - 3
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
