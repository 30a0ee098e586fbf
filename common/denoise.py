"""The DiT denoising loop, without any encoder: diffusers schedulers configured as training, seeded
initial noise, classifier-free guidance. `osp sample` (osp.common.sampling) runs it after the text
encoder; stage 2's validation runs it from cached prompt embeddings (`osp encode-prompts`) on the
model as it is being trained, so this module imports neither the VAE, the text encoder nor transformers.

Reproducibility: the initial latents of a video are drawn on the CPU in fp32 from a generator seeded
with its own seed, and ancestral/DDPM noise comes from a CPU generator seeded with seed + 1, so a video
depends only on its seed and text on every device and layout; the global torch RNG is never drawn from.
"""

from __future__ import annotations

import inspect
import math

import torch

from osp.common.config import (
    DDPM_BETA_END,
    DDPM_BETA_SCHEDULE,
    DDPM_BETA_START,
    DDPM_NUM_TRAIN_TIMESTEPS,
    DEFAULT_SCHEDULER,
    PREDICTION_TYPE,
    SCHEDULERS,
    VAE_STRIDE_H,
    VAE_STRIDE_W,
    latent_frames,
)
from osp.common.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# schedulers: diffusers classes configured exactly as training (linear beta 1e-4..0.02, 1000, eps)
# --------------------------------------------------------------------------------------------------

# the table (name -> diffusers class, extra kwargs) lives in osp.common.config: the CLI offers its names
# as choices without importing torch.


def make_scheduler(name: str = DEFAULT_SCHEDULER):
    """A fresh diffusers scheduler `name` (see SCHEDULERS) with the training noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls(
        num_train_timesteps=DDPM_NUM_TRAIN_TIMESTEPS,
        beta_start=DDPM_BETA_START,
        beta_end=DDPM_BETA_END,
        beta_schedule=DDPM_BETA_SCHEDULE,
        prediction_type=PREDICTION_TYPE,
        **extra,
    )


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal latents drawn on the CPU in fp32 (identical on every device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def guided_eps(
    dit, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, guidance: float, dtype: torch.dtype
) -> torch.Tensor:
    """One CFG prediction. `text`/`mask` hold [negative, positive] rows when guidance != 1, else the
    positive row only (the conditional-only path). Returns eps [1, C, T, H, W] in fp32."""
    cfg = text.shape[0] == 2
    x_in = torch.cat([x, x]) if cfg else x
    t_in = t.reshape(1).expand(x_in.shape[0]).to(x.device)
    eps = dit(x_in.to(dtype), t_in, text, mask).float()
    if not cfg:
        return eps
    eps_neg, eps_pos = eps.chunk(2)
    return eps_neg + guidance * (eps_pos - eps_neg)


def denoise(
    dit,
    scheduler,
    noise: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    guidance: float,
    seed: int,
    dtype: torch.dtype,
    progress=None,
) -> torch.Tensor:
    """The scheduler loop. noise: [1, C, T, H, W] fp32 standard normal (on the target device).
    Returns the final latents (DiT space, i.e. scaled by VAE_SCALE_FACTOR), fp32."""
    device = noise.device
    # a `meta` run (the dry run's memory measurement) has no values to index the schedule by: it stays on the CPU
    scheduler.set_timesteps(steps, device=device if device.type != "meta" else "cpu")
    latents = noise * scheduler.init_noise_sigma
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # ancestral / DDPM noise
        g = torch.Generator(device="cpu")  # CPU stream: the same noise on every device
        g.manual_seed(seed + 1)
        step_kwargs["generator"] = g
    task = progress.add_task("denoise", total=len(scheduler.timesteps)) if progress is not None else None
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        eps = guided_eps(dit, x_in, t, text, mask, guidance, dtype)
        latents = scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    return latents


def latent_shape(dit_config, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """[1, C, t, h, w] of a video of frames x height x width (ceil: a size that is not a multiple is
    cropped after decoding)."""
    return (
        1,
        int(dit_config.in_channels),
        latent_frames(frames),
        math.ceil(height / VAE_STRIDE_H),
        math.ceil(width / VAE_STRIDE_W),
    )


def text_batch(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded text states [L_i, D] (a text cache's entries) -> text [N, L, D] zero-padded to the
    longest, mask [N, L] (1 = a real token), as the trainer's collate pads captions."""
    n = max(int(t.shape[0]) for t in states)
    text = states[0].new_zeros(len(states), n, states[0].shape[1])
    mask = torch.zeros(len(states), n, dtype=torch.long, device=states[0].device)
    for i, t in enumerate(states):
        text[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1
    return text, mask
