"""Text-to-video sampling: prompt -> mT5 -> DiT with classifier-free guidance -> CausalVAE decode -> mp4.
The DiT denoising loop itself (schedulers, initial noise, CFG) is `osp.common.denoise`, which stage 2's
validation runs from cached prompt embeddings without any encoder.

Upstream defaults (Open-Sora-Plan v1.2.0, opensora/sample/): EulerAncestral, 100 steps, guidance 7.5, the upstream
negative prompt, prompt template, both prompts cleaned twice by the IF caption cleaner, text padded to 512 tokens,
CFG batch [negative, positive] with eps = eps_neg + g * (eps_pos - eps_neg), latents / 0.18215 ->
tiled VAE decode (512/64 px, 29/8 frames, overlap 0.125) -> uint8 = trunc(clamp(v/2 + 0.5) * 255)
-> mp4 at 24 fps.

osp's deliberate differences (all reproducibility/precision, none change the model):
* initial latents are drawn on the CPU in fp32 from a generator seeded with `seed + i` for the
  i-th prompt (upstream draws bf16 on the device from one unseeded stream), so a video depends only
  on its own seed and prompt, on every device;
* the scheduler state (latents) is kept in fp32; only the DiT runs in the sampling dtype;
* guidance 1.0 skips the negative prompt entirely (the conditional-only path), as diffusers does.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from osp.common.errors import ConfigError, MissingFileError
from osp.common.config import (
    DEFAULT_SCHEDULER,
    GUIDANCE_SCALE,
    NEGATIVE_PROMPT,
    PROMPT_TEMPLATE,
    SAMPLE_FPS,
    SAMPLE_STEPS,
    SCHEDULERS,  # noqa: F401  (re-exported: callers import the table from here)
    TILING_SAMPLE,
    VAE_SCALE_FACTOR,
    VAE_STRIDE_H,
    VAE_STRIDE_T,
    VAE_STRIDE_W,
)

# the DiT denoising loop (no encoder): shared with stage 2's validation
from osp.common.denoise import denoise, guided_eps, initial_noise, latent_shape, make_scheduler  # noqa: F401

if TYPE_CHECKING:  # loaded lazily at run time (transformers is heavy)
    from osp.common.models.dit import DiTConfig
    from osp.common.models.text import TextEncoder

# --------------------------------------------------------------------------------------------------
# geometry: which sizes a checkpoint was trained for, and which sizes are possible at all
# --------------------------------------------------------------------------------------------------


def trained_size(dit_config) -> tuple[int, int, int]:
    """(frames, height, width) in pixels that the DiT config's sample_size(_t) describe."""
    lat_t = int(dit_config.sample_size_t)
    lat_h, lat_w = (int(v) for v in dit_config.sample_size)
    return (lat_t - 1) * VAE_STRIDE_T + 1, lat_h * VAE_STRIDE_H, lat_w * VAE_STRIDE_W


def check_size(dit_config, frames: int, height: int, width: int, allow_untrained: bool = False) -> list[str]:
    """Raise ValueError on a size the pipeline cannot produce; refuse (or, with allow_untrained, return
    warnings for) a size the weights were not trained for (pure noise, as reported in
    github.com/PKU-YuanGroup/Open-Sora-Plan/issues/356)."""
    spatial = VAE_STRIDE_H * dit_config.patch_size
    if frames < 1 or (frames - 1) % VAE_STRIDE_T:
        raise ConfigError(
            f"--frames {frames} is impossible: use 1 + {VAE_STRIDE_T}k frames (1, 5, 9, ..., 29, ..., 93)"
        )
    for flag, v in (("--height", height), ("--width", width)):
        if v < spatial or v % spatial:
            raise ConfigError(
                f"{flag} {v} is impossible: use a positive multiple of {spatial} px (VAE x{VAE_STRIDE_H}, patch {dit_config.patch_size})"
            )
    tf, th, tw = trained_size(dit_config)
    if (frames, height, width) == (tf, th, tw):
        return []
    msg = (
        f"the checkpoint was trained for {tf}x{th}x{tw} (frames x height x width) but {frames}x{height}x{width} "
        f"was requested; released v1.2 weights give noise at other sizes "
        f"(github.com/PKU-YuanGroup/Open-Sora-Plan/issues/356)"
    )
    if not allow_untrained:
        raise ConfigError(msg + "; drop --frames/--height/--width or pass --allow-untrained-size")
    return [msg]


# --------------------------------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------------------------------


class DiTWeights(Protocol):
    """A resolved DiT checkpoint, handed in by the caller (the CLI opens it with
    `osp.stage2_train.checkpoint.open_dit`, which reads training, osp-dit and released layouts)."""

    @property
    def config(self) -> DiTConfig: ...

    @property
    def identity(self) -> dict:  # what the sample sidecar records about the weights
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full (TP=1) weights, keys and shapes already checked against `config`."""
        ...


def load_dit(weights: DiTWeights, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT of `weights` in eval mode on `device`, every activation in `dtype`."""
    from osp.common.models.dit import build_dit

    model = build_dit(weights.config, device="meta").to_empty(device=device)
    model.load_state_dict(weights.state_dict(), strict=True)
    model = model.to(dtype).eval().requires_grad_(False)
    model.compute_dtype = dtype  # the precision policy: every DiT activation in the sampling dtype
    return model


@dataclass
class Models:
    """The three models of the pipeline, loaded once (the CLI loads them; tests build tiny ones)."""

    dit: torch.nn.Module
    dit_config: DiTConfig
    vae: torch.nn.Module
    text_encoder: TextEncoder
    device: torch.device
    dtype: torch.dtype
    identity: dict = field(default_factory=dict)
    parallel: dict | None = None  # e.g. {"tp": 2, "sp": False, "rank": 0} when the DiT is split over ranks


def load_models(
    dit: DiTWeights,
    vae: str | Path,
    text_encoder: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    dit_transform=None,
) -> Models:
    """Load the DiT (from `dit`, a resolved checkpoint), the text encoder and the VAE. `dit_transform(dit)
    -> dit`, when given, is applied to the loaded DiT (full weights, eval, on the device) before use, e.g.
    to split it over tensor-parallel ranks; the caller owns whatever process groups it needs."""
    from osp.common.device import pick_device
    from osp.common.models.dit import resolve_precision
    from osp.common.models.text import TextEncoder
    from osp.common.models.vae import load_vae, vae_identity

    dev = pick_device(device)
    tdev = dev.set_current() if dev.is_accelerator else dev.torch_device()
    dtype = dtype or resolve_precision("auto", dev.is_accelerator)  # bf16 on accelerators, fp32 on CPU
    dit_config = dit.config
    model = load_dit(dit, tdev, dtype)
    if dit_transform is not None:
        model = dit_transform(model)
    te = TextEncoder.from_pretrained(text_encoder, device=tdev, dtype=dtype)
    if te.dim != dit_config.caption_channels:
        raise ConfigError(
            f"text encoder {text_encoder} outputs {te.dim}-d states but the DiT expects caption_channels="
            f"{dit_config.caption_channels}; pass the text encoder the checkpoint was trained with"
        )
    vae_model = load_vae(vae).to(device=tdev, dtype=dtype).eval().requires_grad_(False)
    identity = {"dit": dit.identity, "vae": vae_identity(vae), "text_encoder": te.identity()}
    return Models(model, dit_config, vae_model, te, tdev, dtype, identity)


# --------------------------------------------------------------------------------------------------
# the pipeline pieces
# --------------------------------------------------------------------------------------------------


def prepare_prompt(prompt: str, template: bool = True, clean: bool = True) -> str:
    """Upstream: the user prompt goes into the template, then through the caption cleaner (twice)."""
    from osp.common.models.text import clean_caption

    text = PROMPT_TEMPLATE.format(prompt) if template else prompt
    return clean_caption(text) if clean else text.lower().strip()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 = trunc(clamp(v/2 + 0.5, 0, 1) * 255) (upstream)."""
    v = (video.float() / 2 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)  # to(uint8) truncates
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, tiling: bool = True) -> torch.Tensor:
    """DiT latents [1, 4, t, h, w] -> video [1, 3, T, H, W] (in [-1, 1], unclamped)."""
    z = latents / VAE_SCALE_FACTOR
    dtype = next(vae.parameters()).dtype
    return vae.decode(z.to(dtype), tiling=TILING_SAMPLE if tiling else None)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = SAMPLE_FPS, crf: int = 18) -> None:
    """[T, H, W, 3] uint8 -> H.264 (libx264, yuv420p) mp4 via PyAV; written to a temp name, then renamed."""
    import av

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    t, h, w, _ = frames.shape
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------------


@dataclass
class SampleSettings:
    prompts: list[str]
    negative_prompt: str = NEGATIVE_PROMPT
    steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE_SCALE
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 42
    frames: int | None = None  # None = the checkpoint's trained size
    height: int | None = None
    width: int | None = None
    template: bool = True
    clean: bool = True
    tiling: bool = True
    fps: int = SAMPLE_FPS
    allow_untrained_size: bool = False


def _slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s[:n].strip("-") or "prompt"


def sample_videos(
    models: Models, settings: SampleSettings, out_dir: str | Path | None = None, progress: bool = True
) -> list[dict]:
    """Run the pipeline for every prompt. Returns one record per video: the settings, the uint8
    frames [T, H, W, 3] (key "frames_uint8") and, when out_dir is given, the mp4 and sidecar paths.
    Debug: with OSP_SAMPLE_DUMP_LATENTS=1 the final fp32 latents are also written next to each mp4
    (<stem>.latents.safetensors, key "latents")."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    s = settings
    if not s.prompts:
        raise ConfigError("no prompts given: pass --prompt TEXT or a --prompt-file with one prompt per line")
    if s.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {s.steps}")
    tf, th, tw = trained_size(models.dit_config)
    frames, height, width = s.frames or tf, s.height or th, s.width or tw
    warns = check_size(models.dit_config, frames, height, width, s.allow_untrained_size)
    for w in warns:
        warnings.warn(w, stacklevel=2)
    make_scheduler(s.scheduler)  # validate the name before any work
    if s.scheduler == "pndm" and s.steps < 4:
        raise ConfigError(f"--scheduler pndm needs --steps >= 4 (its Runge-Kutta warm-up), got {s.steps}")

    # latent geometry (ceil for sizes that are not multiples: the video is cropped after decoding)
    shape = latent_shape(models.dit_config, frames, height, width)
    use_cfg = s.guidance != 1.0
    positives = [prepare_prompt(p, s.template, s.clean) for p in s.prompts]
    negative = prepare_prompt(s.negative_prompt, template=False, clean=s.clean) if use_cfg else None
    captions = ([negative] if negative is not None else []) + positives
    emb, mask = models.text_encoder.encode(captions)  # [N, 512, D], [N, 512]
    emb = emb.to(models.dtype)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    records = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        for i, (raw, pos) in enumerate(zip(s.prompts, positives)):
            seed = s.seed + i
            k = i + 1 if use_cfg else i
            rows = [0, k] if use_cfg else [k]
            text, tmask = emb[rows], mask[rows]
            noise = initial_noise(shape, seed).to(models.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                latents = denoise(
                    models.dit,
                    make_scheduler(s.scheduler),
                    noise,
                    text,
                    tmask,
                    s.steps,
                    s.guidance,
                    seed,
                    models.dtype,
                    progress=bar if progress else None,
                )
            t1 = time.perf_counter()
            video = decode_latents(models.vae, latents, s.tiling)[0]
            video = video[:, :frames, :height, :width]
            pixels = to_uint8(video)
            t2 = time.perf_counter()
            rec = {
                "prompt": raw,
                "prompt_used": pos,
                "negative_prompt_used": negative,
                "seed": seed,
                "frames": frames,
                "height": height,
                "width": width,
                "latent_shape": list(shape[1:]),
                "settings": {**asdict(s), "prompts": None},
                "scheduler_config": dict(make_scheduler(s.scheduler).config),
                "device": str(models.device),
                "dtype": str(models.dtype).removeprefix("torch."),
                "seconds": {"denoise": round(t1 - t0, 3), "decode": round(t2 - t1, 3)},
                "identity": models.identity,
            }
            if models.parallel is not None:
                rec["parallel"] = dict(models.parallel)
            if out is not None:
                stem = f"{i:03d}-{_slug(raw)}"
                write_mp4(out / f"{stem}.mp4", pixels, fps=s.fps)
                if os.environ.get("OSP_SAMPLE_DUMP_LATENTS", "") not in ("", "0"):
                    from safetensors.torch import save_file

                    save_file(
                        {"latents": latents.detach().float().cpu().contiguous()},
                        str(out / f"{stem}.latents.safetensors"),
                    )
                rec["video"] = str(out / f"{stem}.mp4")
                sidecar = out / f"{stem}.json"
                sidecar.write_text(json.dumps(rec, indent=2, default=str) + "\n")
                rec["sidecar"] = str(sidecar)
            rec["frames_uint8"] = pixels
            records.append(rec)
    return records


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line (lines starting with # are comments)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompt file {path} does not exist")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts: write one prompt per line")
    return prompts
