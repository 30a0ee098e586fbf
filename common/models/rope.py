"""3-D rotary position embedding of the Open-Sora Plan v1.2 DiT
(upstream: `RoPE3D` in opensora/models/diffusion/opensora/rope.py of the Open-Sora-Plan v1.2.0 repository).

The head dim is cut into three equal contiguous chunks (32/32/32 at head dim 96): the first rotates
with the latent-frame index t, the second with the patch-row index y, the third with the patch-column
index x. Inside a chunk of width c the rotation is "rotate-half" (not interleaved pairs):

    angle_j(p) = (p / s) * theta^(-2j / c),  j = 0 .. c/2 - 1
    cos = [cos angle_0..angle_{c/2-1}, cos angle_0..angle_{c/2-1}]   (sin likewise)
    v'  = v * cos + rot(v) * sin,  rot(v) = [-v[c/2:], v[:c/2]]

with s the axis' interpolation scale from the DiT config and theta = ROPE_THETA (config.py).

Precision (osp's choice): cos/sin are evaluated ONCE per grid in fp32 and only then cast to
the activation dtype, so TP=1 and TP>1, training and sampling, all rotate with the same numbers.
(Upstream casts the angles to the activation dtype first and evaluates cos/sin in bf16; in fp32 the
two are identical, so the fp32 upstream parity holds bit for bit.)

Fused application: rot(v) is a signed swap of the two halves of each chunk, so with the sign folded
into a precomputed table, sin_s = [-sin_lo, +sin_hi] per chunk,

    v' = v * cos + swap(v) * sin_s          (swap: an involutive channel permutation)

one elementwise expression; `apply_rope` runs it as one autograd op whose backward is the same
expression with the transposed rotation, g' = g * cos + swap(g * sin_s), saving nothing but the
tables (no activation is kept for backward). Under `model.compile` inductor emits it as one kernel.

Table cache quirk (switch `quirk_table_cache`): upstream caches each axis' table
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
    """cos and signed sin [S, hd] of one token grid, evaluated once in fp32 (rows = sequence positions,
    so a context-parallel rank can slice its own positions), cast per activation dtype on first use."""

    def __init__(self, angles: torch.Tensor):
        self.angles = angles  # [S, hd] fp32 (or fp64 in tests)
        self.cos = angles.cos()
        self.sin = swap_halves_sign(angles.sin())
        self._cs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {angles.dtype: (self.cos, self.sin)}

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) in `dtype`: evaluated in the table dtype, then cast."""
        if dtype not in self._cs:
            self._cs[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cs[dtype]


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[a | b] -> [b | a] inside each of the three head-dim chunks (a permutation, its own inverse)."""
    return x.unflatten(-1, (3, 2, x.shape[-1] // 6)).flip(-2).flatten(-3)


def swap_halves_sign(sin: torch.Tensor) -> torch.Tensor:
    """sin [.., hd] -> the signed table sin_s with rot(v) * sin == swap(v) * sin_s: [-lo | +hi] per chunk."""
    sign = torch.ones(3, 2, 1, dtype=sin.dtype, device=sin.device)
    sign[:, 0] = -1
    return (sin.unflatten(-1, (3, 2, sin.shape[-1] // 6)) * sign).flatten(-3)


def rotate_half_3d(x: torch.Tensor) -> torch.Tensor:
    """rot() applied to each of the three head-dim chunks: [a | b] -> [-b | a] per chunk (reference form)."""
    c2 = x.shape[-1] // 6
    x = x.unflatten(-1, (3, 2, c2))  # [..., chunk, half, c/2]
    a, b = x[..., 0, :], x[..., 1, :]
    return torch.stack([-b, a], dim=-2).flatten(-3)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """The single elementwise expression (also the backward with the tables' roles as documented above)."""
    return x * cos + swap_halves(x) * sin_s  # (not addcmul: an FMA would round differently from upstream)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin_s):
        ctx.save_for_backward(cos, sin_s)
        return rope_rotate(x, cos, sin_s)

    @staticmethod
    def backward(ctx, g):
        cos, sin_s = ctx.saved_tensors
        return g * cos + swap_halves(g * sin_s), None, None


def apply_rope(x: torch.Tensor, table: "RopeTable | tuple[torch.Tensor, torch.Tensor]") -> torch.Tensor:
    """x [B, heads, S, hd] -> rotated x (same shape, same dtype). `table` is a RopeTable or the
    (cos, signed sin) pair already in x's dtype (what the blocks receive)."""
    cos, sin_s = table.cos_sin(x.dtype) if isinstance(table, RopeTable) else table  # [S, hd]
    if torch.compiler.is_compiling():
        return rope_rotate(x, cos, sin_s)  # inductor fuses the expression (and derives its backward)
    return _Rope.apply(x, cos, sin_s)
