"""The training objective of Open-Sora Plan v1.2 (upstream: opensora/train/train_t2v_diffusers.py), written out
so stage 2 needs no diffusers.

    z0  = 0.18215 * (mean + exp(logvar / 2) * eps_post)        posterior re-sampled every step
    eps = N(0, I) + noise_offset * N(0, I)[B, C, 1, 1, 1]
    t   ~ U{0, ..., 999}
    x_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * eps              DDPM, linear beta 1e-4 .. 0.02
    loss = mean_b( w_b * mean_{c,t,h,w} (eps_hat - eps)^2 ),  w = min(SNR, gamma) / SNR   (fp32)

The randomness of each sample comes from a generator seeded by (seed, optimizer step, sample row):
identical on the ranks of a tensor-parallel group, different across samples, the same again after a
resume, and independent of the layout (DP size, batch_size x grad_accum split, TP/SP), so a run resumed
on another layout draws what an uninterrupted run on that layout draws. (`draw` with `step_seed` of
(seed, step, micro, dp_rank) remains for batches without rows.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from osp.common import config as C


def alphas_cumprod(
    num_steps: int = C.DDPM_NUM_TRAIN_TIMESTEPS,
    beta_start: float = C.DDPM_BETA_START,
    beta_end: float = C.DDPM_BETA_END,
) -> torch.Tensor:
    """abar_t of the linear-beta DDPM schedule, in fp32 like diffusers' DDPMScheduler. [num_steps]"""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def snr(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar / (1 - abar), computed as (alpha / sigma)^2 like diffusers' compute_snr. [B]"""
    alpha = abar.to(t.device)[t] ** 0.5
    sigma = (1.0 - abar.to(t.device)[t]) ** 0.5
    return (alpha / sigma) ** 2


def min_snr_weight(abar: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """w = min(SNR, gamma) / SNR for epsilon prediction; all ones when gamma <= 0. [B]"""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    s = snr(abar, t)
    return torch.clamp(s, max=gamma) / s


def add_noise(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; z0, eps [B, C, T, H, W], t [B]."""
    a = abar.to(device=z0.device, dtype=z0.dtype)[t]
    shape = (-1,) + (1,) * (z0.dim() - 1)
    return a.sqrt().view(shape) * z0 + (1.0 - a).sqrt().view(shape) * eps


def sample_posterior(moments: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps with logvar clamped (LOGVAR_CLAMP); moments [B, 2C, ...] -> [B, C, ...]."""
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(*C.LOGVAR_CLAMP)
    return mean + torch.exp(0.5 * logvar) * eps


def step_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """A 63-bit seed for one micro-batch, mixed by numpy's SeedSequence (no collisions across steps/ranks)."""
    state = np.random.SeedSequence([seed, step, micro, dp_rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


@dataclass
class Draws:
    """The random numbers of one micro-batch (drawn on CPU in a fixed order, then moved)."""

    eps_post: torch.Tensor  # [B, C, T, H, W] posterior sample noise
    noise: torch.Tensor  # [B, C, T, H, W] diffusion noise incl. the offset
    t: torch.Tensor  # [B] int64 in [0, num_steps)
    drop: torch.Tensor  # [B] bool: caption replaced by the empty-caption embedding


def draw(
    shape: tuple[int, ...],
    seed: int,
    noise_offset: float,
    cfg_dropout: float,
    num_steps: int = C.DDPM_NUM_TRAIN_TIMESTEPS,
) -> Draws:
    """shape = (B, C, T, H, W) of the latent z0."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    eps_post = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    offset = torch.randn((b, c) + (1,) * (len(shape) - 2), generator=g)
    t = torch.randint(0, num_steps, (b,), generator=g)
    drop = torch.rand((b,), generator=g) < cfg_dropout
    if noise_offset:
        noise = noise + noise_offset * offset
    return Draws(eps_post, noise, t, drop)


def sample_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit seed for one sample (index row) at one optimizer step."""
    state = np.random.SeedSequence([seed, step, row, 0x5A]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def draw_samples(
    shape: tuple[int, ...],
    seed: int,
    step: int,
    rows: list[int],
    noise_offset: float,
    cfg_dropout: float,
    num_steps: int = C.DDPM_NUM_TRAIN_TIMESTEPS,
) -> Draws:
    """`draw` per sample (seeded by `sample_seed(seed, step, row)`), stacked: shape[0] == len(rows)."""
    if len(rows) != shape[0]:
        raise ValueError(f"draw_samples: {len(rows)} rows for a batch of {shape[0]}")
    one = (1,) + tuple(shape[1:])
    ds = [draw(one, sample_seed(seed, step, r), noise_offset, cfg_dropout, num_steps) for r in rows]
    return Draws(*(torch.cat([getattr(d, f) for d in ds]) for f in ("eps_post", "noise", "t", "drop")))


def diffusion_loss(
    eps_hat: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR weighted epsilon MSE in fp32, per sample: [B]."""
    mse = (eps_hat.float() - eps.float()) ** 2
    per_sample = mse.mean(dim=tuple(range(1, mse.dim())))
    return per_sample * min_snr_weight(abar, t, gamma).to(per_sample.device)
