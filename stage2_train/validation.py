"""Validation during training: every `validate.every` steps all ranks sample latents of the cached
validation prompts with the EMA weights, under the training layout (TP/SP/CP as trained; every DP
replica samples the same videos), rank 0 writes them, and training goes on.

    <run>/validation/step-0000100/
        latents.safetensors   "latents.0000", ... [1, C, t, h, w] fp32: final latents in DiT space
                              (scaled by the VAE scale factor, as `osp sample` produces them)
        settings.json         step, prompts, seeds, steps, guidance, scheduler, frames, size, weights,
                              the prompts' text cache (path, text_id, keys), seconds
        complete              written last: the step folder is whole (`osp validate` waits for it)

The denoising loop is `osp.common.denoise` (no VAE, no text encoder): the prompts come from a text
cache written by `osp encode-prompts` (`osp.common.prompt_cache`), whose `text_id` must be the one of
the training caches (manifest data only), checked at start. The training state is left exactly as it was: the model's weights are restored bit for bit
after the EMA swap, the global RNG is forked (the sampling noise comes from its own CPU generators)
and the data loader is not touched, so the losses of a run with validation equal those without.
`osp validate RUN --vae DIR` (osp.common.validate) decodes the latents to mp4 next to the run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from osp.common import config as C
from osp.common import shards as S
from osp.common.denoise import denoise, initial_noise, make_scheduler, text_batch
from osp.common.errors import ConfigError
from osp.common.prompt_cache import PromptCache, PromptCacheError, read_prompt_cache, same_text_encoder
from osp.common.validation_files import COMPLETE, LATENTS, SETTINGS, latent_key, step_dir
from osp.stage2_train.geometry import Geometry, data_sources, video_tokens
from osp.stage2_train.layout import Layout


@dataclass
class Prompts:
    """What the sampling needs of a prompt cache: texts per prompt, the negative, and its record."""

    prompts: list[str]
    texts: list[torch.Tensor]
    negative: torch.Tensor
    record: dict


def cached_prompts(cfg, dit_cfg) -> Prompts:
    """validate.prompts, refused in one line when its text encoder is not the one of the training caches
    (by text_id: a bf16 conversion of the encoder matches its source) or its width is not the DiT's."""
    cache: PromptCache = read_prompt_cache(cfg.validate.prompts)
    root = Path(data_sources(cfg)[0]["shards"])  # the sources share one text encoder (checked with the geometry)
    manifest = S.read_manifest(root)
    run_id = S.cache_text_id(root, manifest)
    if not same_text_encoder(cache.manifest, run_id, manifest.get("text_encoder")):
        ours = _encoder_name(cache.manifest.get("text_encoder"), cache.text_id)
        theirs = _encoder_name(manifest.get("text_encoder"), run_id)
        raise PromptCacheError(
            f"validate.prompts={cfg.validate.prompts}: encoded by the text encoder {ours}, but {root} was encoded by "
            f"{theirs}; re-run osp encode-prompts with --text-encoder {_encoder_path(manifest.get('text_encoder'))}"
        )
    if cache.dim != dit_cfg.caption_channels:
        raise PromptCacheError(
            f"validate.prompts={cfg.validate.prompts}: {cache.dim}-d text states, the DiT's caption_channels is "
            f"{dit_cfg.caption_channels}; encode the prompts with the run's text encoder"
        )
    return Prompts(cache.prompts, cache.texts, cache.negative, cache.record)


def _encoder_path(te: dict | None) -> str:
    return str((te or {}).get("path") or "<the training caches' text encoder>")


def _encoder_name(te: dict | None, text_id: str | None) -> str:
    return f"{_encoder_path(te)} (text_id {str(text_id)[:12] if text_id else 'not recorded'})"


class Validation:
    """The trainer's validation part: `due(step)`, then `run(trainer)` on every rank (collective)."""

    def __init__(self, cfg, layout: Layout, dit_cfg, geometry: Geometry, prompts: Prompts, write: bool = True):
        v = cfg.validate
        self.cfg, self.v, self.layout, self.dit_cfg, self.prompts, self.write = cfg, v, layout, dit_cfg, prompts, write
        self.run_dir = cfg.run.path
        t, h, w = max(geometry.shapes)  # the trained video shape (images, T = 1, sort first)
        lt = C.latent_frames(v.num_frames) if v.num_frames else t
        self.shape = (1, dit_cfg.in_channels, lt, h, w)
        self.frames = (lt - 1) * C.VAE_STRIDE_T + 1
        tokens = video_tokens(dit_cfg, (lt, h, w))
        split = (layout.tp if layout.sp else 1) * layout.cp
        if tokens % split:
            raise ConfigError(
                f"validate.num_frames={v.num_frames} gives {tokens} video tokens, not divisible by the "
                f"{split} sequence shards of this layout (tp x cp with sp); pick another num_frames or 0"
            )

    @classmethod
    def for_run(cls, cfg, layout: Layout, dit_cfg, geometry: Geometry) -> Validation | None:
        if cfg.validate.every <= 0:
            return None
        return cls(cfg, layout, dit_cfg, geometry, cached_prompts(cfg, dit_cfg))

    @classmethod
    def for_dry_run(cls, cfg, layout: Layout, dit_cfg, geometry: Geometry) -> Validation | None:
        """The dry run's part: one prompt of the text encoder's full length, one denoising step (each
        step's buffers are freed before the next: one step holds the loop's peak), nothing written."""
        if cfg.validate.every <= 0:
            return None
        text = torch.zeros(C.TEXT_MAX_LENGTH, dit_cfg.caption_channels)
        prompts = Prompts(["dry run"], [text], text, {})
        v = cls(cfg, layout, dit_cfg, geometry, prompts, write=False)
        v.v = type(v.v)(**{**vars(v.v), "steps": 1})
        return v

    def due(self, step: int) -> bool:
        return step % self.v.every == 0

    def run(self, trainer) -> float:
        """Sample every prompt with the EMA weights (the model's own without an EMA) on every rank;
        rank 0 writes the step folder. Returns the seconds spent."""
        t0 = time.perf_counter()
        model, v, dev = trainer.model, self.v, trainer.dev
        dtype = getattr(model, "compute_dtype", torch.float32)
        use_cfg = v.guidance != 1.0
        swap = trainer.ema.swapped_in(model) if trainer.ema is not None else nullcontext()
        fork = [dev] if dev.type in ("cuda", "npu") else []
        latents = []
        was_training = model.training
        with torch.random.fork_rng(devices=fork, device_type=dev.type if fork else "cuda"), swap, torch.no_grad():
            model.eval()
            try:
                for i, text in enumerate(self.prompts.texts):
                    states = [self.prompts.negative, text] if use_cfg else [text]
                    emb, mask = text_batch([s.to(dev) for s in states])
                    seed = v.seed + i
                    noise = initial_noise(self.shape, seed).to(dev)
                    z = denoise(model, make_scheduler(v.scheduler), noise, emb, mask, v.steps, v.guidance, seed, dtype)
                    latents.append(z)
            finally:
                model.train(was_training)
        trainer.device.synchronize()
        seconds = time.perf_counter() - t0
        if self.write and self.layout.is_main:
            self._write(trainer.step, latents, seconds, "ema" if trainer.ema is not None else "model")
        return seconds

    def _write(self, step: int, latents: list[torch.Tensor], seconds: float, weights: str) -> Path:
        out = step_dir(self.run_dir, step)
        if out.exists():  # a step redone after a resume replaces its folder
            shutil.rmtree(out)
        out.mkdir(parents=True)
        save_file({latent_key(i): z.detach().float().cpu().contiguous() for i, z in enumerate(latents)}, out / LATENTS)
        v = self.v
        settings = {
            "step": step,
            "prompts": self.prompts.prompts,
            "seeds": [v.seed + i for i in range(len(latents))],
            "steps": v.steps,
            "guidance": v.guidance,
            "scheduler": v.scheduler,
            "frames": self.frames,
            "height": self.shape[3] * C.VAE_STRIDE_H,
            "width": self.shape[4] * C.VAE_STRIDE_W,
            "latent_shape": list(self.shape[1:]),
            "latent_channels": int(self.shape[1]),
            "scale_factor": C.VAE_SCALE_FACTOR,
            "weights": weights,
            "prompt_cache": self.prompts.record,
            "layout": self.layout.sizes(),
            "seconds": round(seconds, 3),
        }
        (out / SETTINGS).write_text(json.dumps(settings, indent=2, default=str) + "\n")
        for f in (out / LATENTS, out / SETTINGS):
            _fsync(f)
        (out / COMPLETE).write_text(f"{step}\n")
        _fsync(out)
        return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
