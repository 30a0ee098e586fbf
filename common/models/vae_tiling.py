"""Tiled CausalVAE encode/decode exactly as Open-Sora Plan v1.2 does it
(upstream: `tiled_encode`/`tiled_decode` in opensora/models/causalvideovae/model/causal_vae/modeling_causalvae.py).

Temporal chunks of S frames (encode) or S latent frames (decode) start at 0, S-1, 2(S-1), ... and
share one frame with their neighbour; every chunk but the first drops its first output frame. Each
chunk is cut into spatial tiles at multiples of the stride floor(tile * (1 - overlap)); the tiles'
outputs (8-channel moments when encoding, pixels when decoding) are blended in place in raster order
with the (already blended) tile above and to the left over E rows/columns, cropped to their first R
rows/columns and concatenated.

The functions take the per-tile map as a callable, so the same code serves the model and tests that
check the bookkeeping with maps whose exact tiled result is known.
"""

from __future__ import annotations

from typing import Callable

import torch

from osp.common.config import VAE_STRIDE_H, VAE_STRIDE_T, TileConfig

TileFn = Callable[[torch.Tensor], torch.Tensor]


def validate_tiling(tile: TileConfig) -> None:
    """Reject settings for which upstream's tiling changes output shapes or breaks: the untiled
    shape is kept only when tile_latent_min_size * overlap is a whole number."""
    where = f"tiling {tile}"
    if not 0.0 <= tile.overlap < 1.0:
        raise ValueError(f"{where}: overlap must be in [0, 1)")
    if tile.latent_size < 1 or tile.sample_size != tile.latent_size * VAE_STRIDE_H:
        raise ValueError(f"{where}: sample_size must be {VAE_STRIDE_H} x latent_size (e.g. 256/32 or 512/64)")
    blend = tile.latent_size * tile.overlap
    if abs(blend - round(blend)) > 1e-9:
        raise ValueError(
            f"{where}: latent_size x overlap = {blend} must be a whole number, else tiled shapes differ from untiled; e.g. 32 or 64 with 0.125"
        )
    for size in (tile.latent_size, tile.sample_size):  # float rounding in int(size * (1 - f)) must not lose a row
        if int(size * (1 - tile.overlap)) + int(size * tile.overlap) != size:
            raise ValueError(
                f"{where}: stride int({size} x (1 - overlap)) and blend int({size} x overlap) do not add up to {size}; pick an overlap like 0.125 or 0.25"
            )
    if int(tile.latent_size * (1 - tile.overlap)) < 1:
        raise ValueError(f"{where}: tile stride is 0; lower the overlap")
    if tile.sample_size_t < 2 or (tile.sample_size_t - 1) % VAE_STRIDE_T:
        raise ValueError(f"{where}: sample_size_t must be 1 + {VAE_STRIDE_T}k with k >= 1 (e.g. 29 or 33)")
    if tile.latent_size_t < 2:
        raise ValueError(f"{where}: latent_size_t must be at least 2 (e.g. 8 or 16)")


def needs_tiling_encode(shape, tile: TileConfig) -> bool:
    """Upstream trigger: W or H above the pixel tile, or T above the frame chunk."""
    t, h, w = shape[-3:]
    return w > tile.sample_size or h > tile.sample_size or t > tile.sample_size_t


def needs_tiling_decode(shape, tile: TileConfig) -> bool:
    t, h, w = shape[-3:]
    return w > tile.latent_size or h > tile.latent_size or t > tile.latent_size_t


def temporal_chunks(t: int, size: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most `size` frames, consecutive chunks sharing one frame.
    E.g. t=93, size=33 -> [0,33) [32,65) [64,93); t=24, size=8 -> [0,8) [7,15) [14,22) [21,24)."""
    starts = list(range(0, t, size - 1))
    if len(starts) == 1:
        return [(0, t)]
    chunks = [(starts[i], starts[i + 1] + 1) for i in range(len(starts) - 1)]
    last_start, last_end = chunks[-1]
    if last_end > t:
        chunks[-1] = (last_start, t)
    elif last_end < t:
        chunks.append((starts[-1], t))
    return chunks


def _weights(e: int, like: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - y/E, y/E) for y < E, each computed in double and rounded once, as upstream's scalars are."""
    wa = torch.tensor([1 - y / e for y in range(e)], dtype=like.dtype, device=like.device).view(shape)
    wb = torch.tensor([y / e for y in range(e)], dtype=like.dtype, device=like.device).view(shape)
    return wa, wb


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: tile[.., y, :] = above[.., y-E, :] * (1 - y/E) + tile[.., y, :] * y/E, y < E."""
    e = min(above.shape[3], tile.shape[3], extent)
    if e <= 0:
        return
    wa, wb = _weights(e, tile, (1, 1, 1, e, 1))
    tile[:, :, :, :e, :] = above[:, :, :, -e:, :] * wa + tile[:, :, :, :e, :] * wb


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    e = min(left.shape[4], tile.shape[4], extent)
    if e <= 0:
        return
    wa, wb = _weights(e, tile, (1, 1, 1, 1, e))
    tile[:, :, :, :, :e] = left[:, :, :, :, -e:] * wa + tile[:, :, :, :, :e] * wb


def tiled_2d(x: torch.Tensor, fn: TileFn, in_tile: int, stride: int, blend: int, keep: int) -> torch.Tensor:
    """Cut x [B, C, T, H, W] into in_tile x in_tile tiles at multiples of `stride`, map each with fn,
    blend in raster order in place, crop each to keep x keep, concatenate."""
    rows = []
    for i in range(0, x.shape[3], stride):
        rows.append([fn(x[:, :, :, i : i + in_tile, j : j + in_tile]) for j in range(0, x.shape[4], stride)])
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_rows(rows[i - 1][j], tile, blend)
            if j > 0:
                _blend_cols(row[j - 1], tile, blend)
            kept.append(tile[:, :, :, :keep, :keep])
        out_rows.append(torch.cat(kept, dim=4))
    return torch.cat(out_rows, dim=3)


def _tiled(x: torch.Tensor, fn2d: TileFn, chunk: int) -> torch.Tensor:
    outs = []
    for idx, (start, end) in enumerate(temporal_chunks(x.shape[2], chunk)):
        y = fn2d(x[:, :, start:end])
        outs.append(y if idx == 0 else y[:, :, 1:])
    return torch.cat(outs, dim=2)


def tiled_encode(video: torch.Tensor, encode_tile: TileFn, tile: TileConfig) -> torch.Tensor:
    """video [B, 3, T, H, W] -> moments, tile by tile (encode_tile = encoder + quant_conv)."""
    validate_tiling(tile)
    stride = int(tile.sample_size * (1 - tile.overlap))
    blend = int(tile.latent_size * tile.overlap)
    keep = tile.latent_size - blend

    def fn2d(chunk: torch.Tensor) -> torch.Tensor:
        return tiled_2d(chunk, encode_tile, tile.sample_size, stride, blend, keep)

    return _tiled(video, fn2d, tile.sample_size_t)


def tiled_decode(z: torch.Tensor, decode_tile: TileFn, tile: TileConfig) -> torch.Tensor:
    """z [B, 4, t, h, w] -> video, tile by tile (decode_tile = post_quant_conv + decoder)."""
    validate_tiling(tile)
    stride = int(tile.latent_size * (1 - tile.overlap))
    blend = int(tile.sample_size * tile.overlap)
    keep = tile.sample_size - blend

    def fn2d(chunk: torch.Tensor) -> torch.Tensor:
        return tiled_2d(chunk, decode_tile, tile.latent_size, stride, blend, keep)

    return _tiled(z, fn2d, tile.latent_size_t)
