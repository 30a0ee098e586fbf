"""The data's geometry as the trainer needs it, checked against the DiT before anything is built:
the unconditional text, the latent channels (moments or samples), the latent shapes trained on and
the video tokens per sample (the layout checks need them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from osp.common import shards as S
from osp.common.errors import ConfigError
from osp.stage2_train.data import CorruptSampleError, ShardDataset, corrupt_message


@dataclass(frozen=True)
class Geometry:
    uncond: torch.Tensor  # [L, Dtxt] the empty caption's encoding (caption dropout)
    latent_channels: int  # 2 x in_channels for posterior moments, in_channels for samples
    shapes: frozenset[tuple[int, int, int]]  # latent T x H x W trained on
    tokens: int  # video tokens per sample (of the DiT's sample size)


def video_tokens(dit_cfg, shape: tuple[int, ...]) -> int:
    """Video tokens of one latent T x H x W under the DiT's patching."""
    t, h, w = shape
    return (t // dit_cfg.patch_size_t) * (h // dit_cfg.patch_size) * (w // dit_cfg.patch_size)


def shard_geometry(cfg, dit_cfg, console) -> Geometry:
    """The manifest/index geometry of `data.shards`, which must match the DiT (one-line errors)."""
    root = Path(cfg.data.shards)
    manifest = S.read_manifest(root)
    index = S.ShardIndex.open(root)
    if len(index) == 0:
        raise ConfigError(f"{root}: the index holds no samples; encode some clips first (osp encode)")
    first = _first_readable(root, index, cfg.data.skip_corrupt)
    c = int(first.latent.shape[0])
    d = dit_cfg
    if c not in (d.in_channels, 2 * d.in_channels):
        raise ConfigError(
            f"{root}: latents have {c} channels, the DiT takes {d.in_channels} (moments {2 * d.in_channels}); "
            "encode with the VAE that matches the DiT"
        )
    uncond = S.read_uncond(root)
    for what, dim in (("samples' text", int(first.text.shape[1])), ("uncond.safetensors", int(uncond.shape[1]))):
        if dim != d.caption_channels:
            raise ConfigError(
                f"{root}: {what} width is {dim} but the DiT's caption_channels is {d.caption_channels}; "
                f"use the DiT preset matching the shards' text encoder ({manifest.get('preset', 'see manifest.json')})"
            )
    shapes = {(int(t), int(h), int(w)) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w)}
    want = (int(d.sample_size_t), int(d.sample_size[0]), int(d.sample_size[1]))
    image = (1,) + want[1:]
    bad = sorted(s for s in shapes if s not in (want, image))
    if bad:
        raise ConfigError(
            f"{root}: latent T x H x W {bad[0]} (of {len(index)} samples) does not match the DiT's "
            f"sample_size_t x sample_size {want}; train the DiT preset matching the encode preset "
            f"({manifest.get('preset', 'see manifest.json')}) or re-encode"
        )
    train = frozenset({want, image} if cfg.data.images else {want})
    n_used = sum(int((t, h, w) in train) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w))
    if n_used < len(index):
        console.print(
            f"{root}: training on the {n_used} samples of shape {want}; "
            f"{len(index) - n_used} single-frame samples left out (data.images=true includes them)"
        )
    return Geometry(uncond, c, train, video_tokens(d, want))


def _first_readable(root: Path, index, skip_corrupt: bool) -> S.Sample:
    """The first row that passes its checks (a corrupt row 0 stops the run unless data.skip_corrupt)."""
    ds = ShardDataset(root, index)
    for i in range(len(index)):
        item = ds[i]
        if not isinstance(item, dict):
            return item[1]
        if not skip_corrupt:
            raise CorruptSampleError(corrupt_message(item, root))
    raise CorruptSampleError(f"{root}: all {len(index)} samples are corrupt; re-encode (osp shards verify {root})")
