"""The data's geometry as the trainer needs it, checked against the DiT before anything is built:
the unconditional text, the latent channels (moments or samples), the latent shapes trained on and
the video tokens per sample (the layout checks need them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from osp.common import shards as S
from osp.common import storage
from osp.common.errors import ConfigError
from osp.stage2_train.data import CorruptSampleError, ShardDataset, corrupt_message


@dataclass(frozen=True)
class Geometry:
    uncond: torch.Tensor  # [L, Dtxt] the empty caption's encoding (caption dropout)
    latent_channels: int  # 2 x in_channels for posterior moments, in_channels for samples
    shapes: frozenset[tuple[int, int, int]]  # latent T x H x W trained on
    tokens: int  # video tokens per sample (the largest shape trained on)
    bucket_tokens: tuple[tuple[tuple[int, int, int], int], ...] = ()  # (shape, video tokens) per shape


def video_tokens(dit_cfg, shape: tuple[int, ...]) -> int:
    """Video tokens of one latent T x H x W under the DiT's patching."""
    t, h, w = shape
    return (t // dit_cfg.patch_size_t) * (h // dit_cfg.patch_size) * (w // dit_cfg.patch_size)


def data_sources(cfg) -> list[dict]:
    """`data.sources`, or the one `data.shards` folder with weight 1."""
    return list(cfg.data.sources) or [{"shards": cfg.data.shards, "weight": 1.0}]


def shards_location(shards: str | Path) -> Path | str:
    """A cache of the run as a folder, or its object-store URL kept as a string."""
    return str(shards) if storage.is_url(shards) else Path(shards)


def remote_data(cfg) -> bool:
    """Whether any cache of the run is in an object store."""
    return any(storage.is_url(src["shards"]) for src in data_sources(cfg))


def configure_storage(cfg) -> None:
    """The data section's object-store settings, applied (process-wide, inherited by the loader workers)
    when a cache of the run is an object-store URL."""
    if remote_data(cfg):
        d = cfg.data
        storage.configure(
            endpoint_url=d.endpoint_url or None,
            cache_dir=d.cache_dir or None,
            cache_bytes=d.cache_bytes,
            timeout_s=d.timeout_s,
            retries=d.retries,
        )


def shard_geometry(cfg, dit_cfg, console) -> Geometry:
    """The manifest/index geometry of the run's caches (`data.shards`, or every cache of `data.sources`),
    which must match the DiT and each other (one-line errors naming the caches)."""
    sources = data_sources(cfg)
    configure_storage(cfg)
    d = dit_cfg
    want = (int(d.sample_size_t), int(d.sample_size[0]), int(d.sample_size[1]))
    mixed = bool(cfg.data.sources)
    ref: dict = {}
    train: set[tuple[int, int, int]] = set()
    uncond = None
    c = 0
    for i, src in enumerate(sources):
        root = shards_location(src["shards"])
        if float(src.get("weight", 1.0)) <= 0:
            raise ConfigError(f"data.sources[{i}] ({root}): weight {src.get('weight')} must be > 0")
        manifest = S.read_manifest(root)
        if S.text_refs(manifest):
            S.open_text_refs(root, manifest)  # a missing or other-encoder text cache: one line naming both
        index = S.ShardIndex.open(root)
        if len(index) == 0:
            raise ConfigError(f"{root}: the index holds no samples; encode some clips first (osp encode)")
        first = _first_readable(root, index, cfg.data.skip_corrupt, manifest)
        assert first.text is not None  # filled from the text cache when referred
        ident = {
            "latent channels": int(first.latent.shape[0]),
            "VAE": (manifest.get("vae") or {}).get("weights_sha256"),
            "text encoder": S.cache_text_id(root, manifest),
        }
        if not ref:
            ref = {"root": root, **ident}
        for what, value in ident.items():
            if value is not None and ref[what] is not None and value != ref[what]:
                raise ConfigError(
                    f"{root}: {what} {str(value)[:16]} differs from {ref['root']}'s {str(ref[what])[:16]}; "
                    f"a run mixes caches of one VAE and one text encoder (re-encode one of them)"
                )
        c = ident["latent channels"]
        if c not in (d.in_channels, 2 * d.in_channels):
            raise ConfigError(
                f"{root}: latents have {c} channels, the DiT takes {d.in_channels} (moments {2 * d.in_channels}); "
                "encode with the VAE that matches the DiT"
            )
        if uncond is None:
            uncond = S.cache_uncond(root)
        for what, dim in (
            ("samples' text", int(first.text.shape[1])),
            ("the empty caption's text", int(uncond.shape[1])),
        ):
            if dim != d.caption_channels:
                raise ConfigError(
                    f"{root}: {what} width is {dim} but the DiT's caption_channels is {d.caption_channels}; "
                    f"use the DiT preset matching the shards' text encoder ({manifest.get('preset', 'see manifest.json')})"
                )
        shapes = {(int(t), int(h), int(w)) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w)}
        bad = sorted(s for s in shapes if s[1:] != want[1:] or not 1 <= s[0] <= want[0])
        if bad:
            raise ConfigError(
                f"{root}: latent T x H x W {bad[0]} (of {len(index)} samples) does not fit the DiT's "
                f"sample_size_t x sample_size {want} (same H x W, T up to {want[0]}); train the DiT preset matching "
                f"the encode preset ({manifest.get('preset', 'see manifest.json')}) or re-encode"
            )
        use = {s for s in shapes if s[0] > 1 or cfg.data.images or mixed}
        if not use:
            raise ConfigError(
                f"{root}: holds only single-frame samples; set data.images=true (or list it in data.sources)"
            )
        n_used = sum(int((t, h, w) in use) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w))
        if n_used < len(index):
            console.print(
                f"{root}: training on the {n_used} samples of shapes {sorted(use)}; "
                f"{len(index) - n_used} single-frame samples left out (data.images=true includes them)"
            )
        train |= use
    assert uncond is not None
    per_shape = tuple(sorted((s, video_tokens(d, s)) for s in train))
    return Geometry(uncond, c, frozenset(train), max(n for _, n in per_shape), per_shape)


def _first_readable(root: Path | str, index, skip_corrupt: bool, manifest: dict | None = None) -> S.Sample:
    """The first row that passes its checks (a corrupt row 0 stops the run unless data.skip_corrupt)."""
    refs = S.text_refs(manifest)
    ds = ShardDataset(root, index, S.TextLookup(S.open_text_refs(root, manifest)) if refs else None)
    for i in range(len(index)):
        item = ds[i]
        if not isinstance(item, dict):
            return item[1]
        if not skip_corrupt:
            raise CorruptSampleError(corrupt_message(item, root))
    raise CorruptSampleError(f"{root}: all {len(index)} samples are corrupt; re-encode (osp shards verify {root})")


def make_loader(cfg, layout, geometry: Geometry):
    """This rank's resumable loader over the run's caches (split over DP; buckets sized by
    data.batch_size or data.tokens_per_batch over the geometry's tokens per shape)."""
    from osp.stage2_train.data import ShardLoader

    tokens = dict(geometry.bucket_tokens)
    if cfg.data.tokens_per_batch and not tokens:
        raise ConfigError("data.tokens_per_batch needs the tokens of every shape (this geometry has none)")
    loader = ShardLoader(
        data_sources(cfg) if cfg.data.sources else cfg.data.shards,
        batch_size=cfg.data.batch_size,
        dp_rank=layout.dp_rank,
        dp_size=layout.dp,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        skip_corrupt=cfg.data.skip_corrupt,  # (a corrupt row left out by the shape filter stops here)
        shapes=set(geometry.shapes),
        grad_accum=cfg.optim.grad_accum,
        tokens_per_batch=cfg.data.tokens_per_batch,
        tokens_of=tokens.__getitem__ if tokens else None,
    )
    loader.skip_corrupt = True  # from here on corrupt samples come back in Batch.skipped; the trainer decides
    return loader
