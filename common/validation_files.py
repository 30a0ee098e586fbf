"""The files of a run's validation steps, shared by their writer (the trainer, osp.stage2_train.validation)
and their reader (the decoding sidecar, osp.common.validate); imports nothing, so the trainer reaches
neither the VAE nor the text encoder through it.

    <run>/validation/step-0000100/
        latents.safetensors   "latents.0000", ... by the trainer
        settings.json         by the trainer
        complete              by the trainer, last: the step is whole
        decoded.json          by the sidecar, last: the step is decoded
"""

from __future__ import annotations

from pathlib import Path

VALIDATION = "validation"  # <run>/validation
LATENTS, SETTINGS, COMPLETE, DECODED = "latents.safetensors", "settings.json", "complete", "decoded.json"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / VALIDATION / f"step-{step:07d}"


def latent_key(i: int) -> str:
    return f"latents.{i:04d}"
