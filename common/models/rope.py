"""3-D rotary position embedding of the Open-Sora Plan v1.2 DiT (spec §3.4).

The head dim is cut into three equal contiguous chunks (32/32/32 at head dim 96): the first rotates
with the latent-frame index t, the second with the patch-row index y, the third with the patch-column
index x. Inside a chunk of width c the rotation is "rotate-half" (not interleaved pairs):

    angle_j(p) = (p / s) * theta^(-2j / c),  j = 0 .. c/2 - 1
    cos = [cos angle_0..angle_{c/2-1}, cos angle_0..angle_{c/2-1}]   (sin likewise)
    v'  = v * cos + rot(v) * sin,  rot(v) = [-v[c/2:], v[:c/2]]

with s the axis' interpolation scale from the DiT config and theta = ROPE_THETA (config.py).

Two upstream behaviours, both reproduced on purpose:
* Precision: the angles are computed in fp32, then cast to the activation dtype and only then passed
  to cos/sin (so in bf16 inference cos/sin are evaluated in bf16). In fp32 this is a no-op.
* Table cache quirk (spec §3.4/§11, switch `quirk_table_cache`): upstream caches each axis' table
  keyed by its length only, building t, then y, then x; an axis whose grid length equals an earlier
  axis' length reuses that earlier table, i.e. the earlier axis' interpolation scale. With the switch
  on, osp does the same within one forward (upstream's cache also persists across calls; that
  cross-call state is not reproduced). The default is OFF: every released geometry (8/24 frames vs
  30 vs 40 rows/cols at 480p; 45 vs 80 at 720p) has three distinct lengths, so both settings give
  bit-identical results there, and for new geometries each axis uses its own documented scale.
"""
from __future__ import annotations

import torch

from osp.common.config import ROPE_THETA


def axis_angles(n: int, chunk: int, scale: float, theta: float = ROPE_THETA, device=None) -> torch.Tensor:
    """fp32 angles [n, chunk] for integer positions 0..n-1 of one axis (the cat(freqs, freqs) layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, chunk, 2, device=device, dtype=torch.float32) / chunk))
    pos = torch.arange(n, device=device, dtype=torch.float32) / scale
    freqs = torch.outer(pos, inv_freq)  # [n, chunk/2]
    return torch.cat([freqs, freqs], dim=-1)  # [n, chunk]


def rope_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    scales: tuple[float, float, float],
    theta: float = ROPE_THETA,
    quirk_table_cache: bool = False,
    device=None,
) -> torch.Tensor:
    """fp32 angle table [S, head_dim] for the full token grid (T, H', W'), token order t-major, x fastest."""
    if head_dim % 6:
        raise ValueError(f"3-D RoPE needs a head dim divisible by 6 (three even chunks), got {head_dim}")
    chunk = head_dim // 3
    tables: list[torch.Tensor] = []
    cache: dict[int, torch.Tensor] = {}
    for n, s in zip(grid, scales):
        if quirk_table_cache and n in cache:
            tables.append(cache[n])  # upstream: same length -> the earlier axis' table (and scale)
            continue
        cache[n] = axis_angles(n, chunk, s, theta, device)
        tables.append(cache[n])
    t, h, w = grid
    ft, fh, fw = tables
    # token (t, y, x) -> [ft[t] | fh[y] | fw[x]]
    full = torch.cat(
        [
            ft[:, None, None, :].expand(t, h, w, chunk),
            fh[None, :, None, :].expand(t, h, w, chunk),
            fw[None, None, :, :].expand(t, h, w, chunk),
        ],
        dim=-1,
    )
    return full.reshape(t * h * w, head_dim)


class RopeTable:
    """The angles of one forward plus cos/sin per activation dtype (computed on first use)."""

    def __init__(self, angles: torch.Tensor):
        self.angles = angles  # [S, hd] fp32
        self._cs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._cs:
            a = self.angles.to(dtype)  # upstream: cast first, then cos/sin in the activation dtype
            self._cs[dtype] = (a.cos(), a.sin())
        return self._cs[dtype]


def rotate_half_3d(x: torch.Tensor) -> torch.Tensor:
    """rot() applied to each of the three head-dim chunks: [a | b] -> [-b | a] per chunk."""
    c2 = x.shape[-1] // 6
    x = x.unflatten(-1, (3, 2, c2))  # [..., chunk, half, c/2]
    a, b = x[..., 0, :], x[..., 1, :]
    return torch.stack([-b, a], dim=-2).flatten(-3)


def apply_rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """x [B, heads, S, hd] -> rotated x (same shape, same dtype)."""
    cos, sin = table.cos_sin(x.dtype)  # [S, hd]
    return x * cos + rotate_half_3d(x) * sin
