"""Constants and pipeline presets of Open-Sora Plan v1.2: the one place for each number.

Model-specific config dataclasses (CausalVAEConfig, DiTConfig) live next to their models and take
their defaults from here; the pipeline presets below tie one geometry to one VAE, DiT and text
encoder preset so that stage 1, stage 2 and sampling agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from osp.common.errors import ConfigError, MissingFileError

# --- VAE (CausalVAEModel_D4_4x8x8) --------------------------------------------------------------
VAE_SCALE_FACTOR = 0.18215  # z_dit = 0.18215 * z_vae; no shift, no per-channel stats in v1.2
VAE_STRIDE_T, VAE_STRIDE_H, VAE_STRIDE_W = 4, 8, 8
LATENT_CHANNELS = 4  # posterior moments carry 2 * 4 = 8 channels (mean || logvar)
LOGVAR_CLAMP = (-30.0, 20.0)


@dataclass(frozen=True)
class TileConfig:
    """CausalVAE tiling: spatial tile in pixels / latent pixels, temporal chunk in frames / latents."""

    sample_size: int
    latent_size: int
    sample_size_t: int
    latent_size_t: int
    overlap: float = 0.125


TILING_TRAIN = TileConfig(sample_size=256, latent_size=32, sample_size_t=33, latent_size_t=16)
TILING_SAMPLE = TileConfig(sample_size=512, latent_size=64, sample_size_t=29, latent_size_t=8)

# --- text encoder (google/mt5-xxl) --------------------------------------------------------------
TEXT_MAX_LENGTH = 512
TEXT_DIM_MT5_XXL = 4096

# --- DiT ----------------------------------------------------------------------------------------
ROPE_THETA = 10000.0  # 3-D RoPE: head dim split into three equal chunks (32/32/32 at head dim 96)
MASK_BIAS = -10000.0  # additive bias for masked keys (upstream value)

# --- training modes (torch-free names, so that configs and `osp train --help` import no torch) --------
PRECISIONS = ("auto", "bf16", "fp32")  # activation dtype of the DiT: auto = bf16 on accelerators, fp32 on CPU
CHECKPOINTING = ("none", "selective", "full")  # activation checkpointing inside every transformer block

# --- diffusion (training schedule; sampling schedulers are configured identically) --------------
DDPM_NUM_TRAIN_TIMESTEPS = 1000
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
DDPM_BETA_SCHEDULE = "linear"
PREDICTION_TYPE = "epsilon"
MIN_SNR_GAMMA = 5.0
NOISE_OFFSET = 0.02
CFG_DROPOUT = 0.1

# --- optimisation (upstream v1.2 recipe) --------------------------------------------------------
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0
EMA_DECAY = 0.999

# --- data ---------------------------------------------------------------------------------------
TRAIN_FPS = 24
ASPECT_TOLERANCE = 1.5  # keep h/w within [a / 1.5, 1.5 * a] of the target aspect a

# --- sampling -----------------------------------------------------------------------------------
SAMPLE_STEPS = 100
GUIDANCE_SCALE = 7.5
SAMPLE_FPS = 24
NEGATIVE_PROMPT = (
    "nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
    "username, blurry."
)
PROMPT_TEMPLATE = "(masterpiece), (best quality), (ultra-detailed), {}."


def latent_frames(num_frames: int) -> int:
    """Latent frames for `num_frames` pixels frames (1 + 4k -> 1 + k; an image stays one frame)."""
    if num_frames < 1 or (num_frames - 1) % VAE_STRIDE_T:
        raise ConfigError(f"num_frames must be 1 + {VAE_STRIDE_T}k, got {num_frames}")
    return (num_frames - 1) // VAE_STRIDE_T + 1


@dataclass(frozen=True)
class PipelinePreset:
    """One trained geometry and the model presets that belong to it."""

    name: str
    num_frames: int
    height: int
    width: int
    dit: str  # key of the DiT preset registry (osp.common.models.dit)
    vae: str  # key of the VAE preset registry (osp.common.models.vae)
    text: str  # "mt5-xxl" (a local google/mt5-xxl folder) or "tiny"
    fps: int = TRAIN_FPS

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (
            LATENT_CHANNELS,
            latent_frames(self.num_frames),
            self.height // VAE_STRIDE_H,
            self.width // VAE_STRIDE_W,
        )


PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    p.name: p
    for p in (
        PipelinePreset("osp12-29x480p", 29, 480, 640, dit="osp12-29x480p", vae="osp12", text="mt5-xxl"),
        PipelinePreset("osp12-93x480p", 93, 480, 640, dit="osp12-93x480p", vae="osp12", text="mt5-xxl"),
        PipelinePreset("osp12-93x720p", 93, 720, 1280, dit="osp12-93x720p", vae="osp12", text="mt5-xxl"),
        # The debug preset: same architectures, narrow widths, 9 x 48 x 64 clips (480p's 4:3 aspect;
        # latents 4 x 3 x 6 x 8, 36 DiT tokens).
        PipelinePreset("tiny", 9, 48, 64, dit="tiny", vae="tiny", text="tiny"),
    )
}


# Sampling schedulers: diffusers classes configured as training (linear beta 1e-4..0.02, 1000, eps).
# name -> (diffusers class, extra kwargs beyond the training schedule; everything else = class defaults)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "dpm-solver": ("DPMSolverMultistepScheduler", {}),
    "dpm-solver-single": ("DPMSolverSinglestepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "kdpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
}
DEFAULT_SCHEDULER = "euler-ancestral"


def get_preset(name: str) -> PipelinePreset:
    try:
        return PIPELINE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PIPELINE_PRESETS)}") from None


def read_config_json(path, what: str, fix: str) -> dict:
    """A model's config.json as a dict, with one-line errors that name the file and the fix."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no {what} config.json; {fix}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of {what} config fields; {fix}")
    return d
