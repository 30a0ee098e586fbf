"""OpenSoraT2V v1.2 ("OpenSoraT2V-ROPE-L/122"): the 3-D full-attention text-to-video DiT
(upstream: opensora/models/diffusion/opensora/modeling_opensora.py of the Open-Sora-Plan v1.2.0 repository).

Forward (B batch, T latent frames, H x W latent pixels, p = 2, S = T * H/2 * W/2 tokens, L text tokens):

    x [B,4,T,H,W] --pos_embed (per-frame Conv2d k2 s2)--> [B,S,D]  (token = (t*H' + y)*W' + x)
    timestep [B] --sinusoid(256, cos first)--> linear_1 -> SiLU -> linear_2 = e_t [B,D]
                 --SiLU -> adaln_single.linear--> t6 [B,6D]
    text [B,L,Dtxt] --caption_projection (Linear, tanh-GELU, Linear)--> [B,L,D]
    N x block (sequence-first [S,B,D]):
        (shift,scale,gate)_msa, (shift,scale,gate)_mlp = rows of (table[6,D] + t6.view(B,6,D))
        h += gate_msa * SelfAttn(LN(h) * (1 + scale_msa) + shift_msa)   (3-D RoPE on q, k)
        h += CrossAttn(h, text)                                          (no norm, no gate, text bias)
        h += gate_mlp * FF(LN(h) * (1 + scale_mlp) + shift_mlp)          (tanh-GELU, 4D)
    final: shift, scale = table[2,D] + e_t; proj_out(LN(h) * (1 + scale) + shift) -> [B,S,16]
    unpatchify (pt, ph, pw, c order) -> eps [B,4,T,H,W]

At tensor-parallel size 1 the parameter names are the released diffusers keys (687 tensors,
2,771,907,856 parameters for the real presets), so `diffusion_pytorch_model.safetensors` loads with
strict=True. The blocks run sequence-first ([S, B, D], Megatron's convention) so that the TP/SP plan of
`osp.stage2_train.parallel` can swap in megatron-core layers and replace four identity hooks
(`scatter_video`, `scatter_text`, `t6_hook`, `gather_video`) without touching this file; the context
parallel plan (`osp.stage2_train.context_parallel`) also replaces `scatter_rope` and the self-attention
kernel `Attention.core`. Activation checkpointing and torch.compile are plans too
(`osp.stage2_train.plan`: they replace each block's forward in place).

Efficiency, all without changing a parameter name or shape:
* precision: `compute_dtype` (bf16 | fp32 | None = the weights' dtype, or the autocast dtype when
  autocast is on) is the dtype of EVERY activation: weights and biases (fp32 masters) are cast at use,
  so bias adds, modulation, residuals, RoPE and the TP/SP collectives run in it; autocast is switched
  off inside so LayerNorm returns the activation dtype (its statistics stay fp32 inside the kernel);
* q/k/v (self-attention) and k/v (cross-attention) are fused at compute time: the (TP-local) weights
  are concatenated per call and one GEMM (one SP all-gather under TP) produces all three;
* RoPE: cos/sin once per grid in fp32, one elementwise op (rope.py);
* `Attention.core(q, k, v, bias)` is the one overridable kernel call (attention.py picks the backend).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F

from torch import nn

from osp.common.config import MASK_BIAS, PRECISIONS, ROPE_THETA, TEXT_DIM_MT5_XXL, read_config_json
from osp.common.errors import ConfigError
from osp.common.models import attention as attn_kernel
from osp.common.models.rope import RopeTable, apply_rope, rope_angles

TIMESTEP_CHANNELS = 256  # sinusoidal timestep embedding width (PixArt adaLN-single)


def resolve_precision(precision: str, is_accelerator: bool) -> torch.dtype:
    """auto -> bf16 on accelerators, fp32 on CPU; parameters / optimizer state / EMA stay fp32 in training."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if is_accelerator else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@dataclass
class DiTConfig:
    """The used fields of the released diffusers `config.json` (same names); unknown keys are ignored.

    `rope_table_cache_quirk` is osp's own switch for the upstream RoPE table-cache quirk (see rope.py;
    default off, identical results at every released geometry).
    """

    num_layers: int = 32
    num_attention_heads: int = 24
    attention_head_dim: int = 96
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    patch_size_t: int = 1
    caption_channels: int = TEXT_DIM_MT5_XXL
    cross_attention_dim: int = 2304
    norm_eps: float = 1e-6
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    use_rope: bool = True
    interpolation_scale_t: float | None = 1.0
    interpolation_scale_h: float | None = 1.0
    interpolation_scale_w: float | None = 1.0
    sample_size: list[int] = field(default_factory=lambda: [60, 80])
    sample_size_t: int = 8
    downsampler: str | None = None
    dropout: float = 0.0
    rope_table_cache_quirk: bool = False

    def __post_init__(self) -> None:
        self.sample_size = (
            list(self.sample_size) if isinstance(self.sample_size, (list, tuple)) else [self.sample_size] * 2
        )
        checks = [
            (self.norm_type == "ada_norm_single", f"norm_type must be 'ada_norm_single', got {self.norm_type!r}"),
            (
                not self.norm_elementwise_affine,
                "norm_elementwise_affine must be false (v1.2 LayerNorms have no parameters)",
            ),
            (self.use_rope, "use_rope must be true (v1.2 uses 3-D RoPE, no absolute position embedding)"),
            (self.downsampler in (None, "", "null"), f"downsampler must be null, got {self.downsampler!r}"),
            (self.patch_size_t == 1, f"patch_size_t must be 1 (per-frame patch embedding), got {self.patch_size_t}"),
            (
                self.activation_fn == "gelu-approximate",
                f"activation_fn must be 'gelu-approximate', got {self.activation_fn!r}",
            ),
            (
                self.attention_head_dim % 6 == 0,
                f"attention_head_dim must be a multiple of 6 for 3-D RoPE, got {self.attention_head_dim}",
            ),
            (
                self.cross_attention_dim == self.inner_dim,
                f"cross_attention_dim must equal heads*head_dim = {self.inner_dim} (text is projected to D first)",
            ),
            (self.dropout == 0.0, "dropout must be 0.0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"DiTConfig: {msg}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def interpolation_scales(self) -> tuple[float, float, float]:
        """(t, h, w); a null field falls back to upstream's formula (OpenSoraT2V.__init__)."""
        st = self.interpolation_scale_t
        if st is None:
            n = self.sample_size_t
            st = (n - 1) // 16 + 1 if n % 2 == 1 else n / 16
        sh = self.interpolation_scale_h if self.interpolation_scale_h is not None else self.sample_size[0] / 30
        sw = self.interpolation_scale_w if self.interpolation_scale_w is not None else self.sample_size[1] / 40
        return float(st), float(sh), float(sw)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_config_json(path, "DiT", "pass the checkpoint folder that holds a valid config.json")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = {"_class_name": "OpenSoraT2V"}
        d.update(asdict(self))
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# 93x480p interpolation scales: 1.0/1.0/1.0. Upstream's 480p training scripts use 1.0/1.0/1.0 and
# MindSpeed-MM's 93x480x640 training config of these same weights does too; the checkpoint was
# fine-tuned from 93x720p (1.0/1.5/2.0), so a loaded config.json always wins over this preset.
DIT_PRESETS: dict[str, DiTConfig] = {
    "osp12-29x480p": DiTConfig(sample_size=[60, 80], sample_size_t=8),
    "osp12-93x480p": DiTConfig(sample_size=[60, 80], sample_size_t=24),
    "osp12-93x720p": DiTConfig(
        sample_size=[90, 160],
        sample_size_t=24,
        interpolation_scale_t=1.0,
        interpolation_scale_h=1.5,
        interpolation_scale_w=2.0,
    ),
    # Same architecture, narrow: 2 blocks, 2 heads x 24 (D 48), text width 64 (= the tiny mT5's d_model),
    # latent 4 x 3 x 6 x 8 (the tiny pipeline preset: 9 x 48 x 64 px) -> 3 x 3 x 4 = 36 tokens.
    "tiny": DiTConfig(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=24,
        caption_channels=64,
        cross_attention_dim=48,
        sample_size=[6, 8],
        sample_size_t=3,
    ),
}


def get_dit_config(preset_or_config: str | DiTConfig | dict | Path) -> DiTConfig:
    if isinstance(preset_or_config, DiTConfig):
        return replace(preset_or_config)
    if isinstance(preset_or_config, dict):
        return DiTConfig.from_dict(preset_or_config)
    if isinstance(preset_or_config, Path) or (isinstance(preset_or_config, str) and preset_or_config.endswith(".json")):
        return DiTConfig.from_json(preset_or_config)
    if preset_or_config in DIT_PRESETS:
        return replace(DIT_PRESETS[preset_or_config])
    raise ConfigError(
        f"unknown DiT preset {preset_or_config!r}; choose one of {sorted(DIT_PRESETS)} or pass a config.json"
    )


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[B] (int or float) -> [B, channels] fp32, cos first: [cos(t f_j), sin(t f_j)], f_j = 1e4^(-j/half)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class Linear(nn.Linear):
    """nn.Linear computing in its input's dtype (the weight and bias are cast at use: fp32 masters,
    bf16 GEMM with the bias add inside it, bf16 output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def fused_linear(x: torch.Tensor, mods: tuple[nn.Module, ...]) -> torch.Tensor:
    """One GEMM for several linears over the same input: their (TP-local) weights and biases are
    concatenated per call (a D x D-sized copy) and the first module's `fused_forward` runs it (under TP
    the plan's column-parallel linear: one SP all-gather of x). Output columns: mods in order."""
    dt = x.dtype
    w = torch.cat([cast(torch.Tensor, m.weight).to(dt) for m in mods])
    b = torch.cat([cast(torch.Tensor, m.bias).to(dt) for m in mods]) if mods[0].bias is not None else None
    fwd = getattr(mods[0], "fused_forward", None)
    return fwd(x, w, b) if fwd is not None else F.linear(x, w, b)


class PatchEmbed(nn.Module):
    """Per-frame Conv2d(k=p, s=p): [B,C,T,H,W] -> [B, T*H'*W', D], time-major token order."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        bias = cast(torch.Tensor, self.proj.bias)  # bias=True
        x = F.conv2d(x, self.proj.weight.to(x.dtype), bias.to(x.dtype), stride=self.proj.stride)  # [B*T, D, H', W']
        x = x.flatten(2).transpose(1, 2)  # [B*T, H'W', D] (row-major y, x)
        return x.reshape(b, -1, x.shape[-1])  # [B, T*H'*W', D]


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class _TimestepEmb(nn.Module):  # holds the name level "emb.timestep_embedder" of the released keys
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class AdaLayerNormSingle(nn.Module):
    """PixArt adaLN-single: timestep -> (t6 [B, 6D] for the blocks, embedded_t [B, D] for the final layer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmb(dim)
        self.linear = Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded_t = self.emb.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # [B, D]
        return self.linear(F.silu(embedded_t)), embedded_t


class CaptionProjection(nn.Module):
    """PixArt-alpha text projection: Linear(Dtxt, D) -> tanh-GELU -> Linear(D, D)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


# ------------------------------------------------------------------------------------------------
# block
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention, sequence-first. The local head count is read from the projection width,
    so the same code runs with all heads (TP=1) or the TP rank's heads (column-parallel q/k/v).
    `core` is the attention kernel: q/k/v [B, h, S, hd] after RoPE (+ additive bias) -> [B, h, S, hd]."""

    def __init__(self, dim: int, kv_dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = Linear(dim, inner, bias=bias)
        self.to_k = Linear(kv_dim, inner, bias=bias)
        self.to_v = Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, dim), nn.Dropout(0.0)])
        # the kernel (scale 1/sqrt(hd), backend chosen by model.attention_backend); a parallel plan may
        # replace it per instance (context parallelism wraps it in all-to-alls)
        self.core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = (
            attn_kernel.attention
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [S, B, h*hd] -> [B, h, S, hd]
        s, b, _ = x.shape
        return x.view(s, b, -1, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        x: torch.Tensor,  # [S, B, D] (a sequence shard under SP; q/k/v are full-length after the gather)
        context: torch.Tensor | None = None,  # [L, B, Dkv]; None = self-attention
        bias: torch.Tensor | None = None,  # additive [B, 1, 1, S_kv]
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # (cos, signed sin) [S, hd]
    ) -> torch.Tensor:
        if context is None:  # one GEMM (one SP all-gather) for q, k, v
            q, k, v = fused_linear(x, (self.to_q, self.to_k, self.to_v)).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = fused_linear(context, (self.to_k, self.to_v)).chunk(2, dim=-1)
        # v as its own tensor: the fused GEMM output is then not kept alive by SDPA's saved v (RoPE keeps
        # no input for backward), which frees 2/3 of it before backward
        q, k, v = self._heads(q), self._heads(k), self._heads(v).contiguous()
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = self.core(q, k, v, bias)  # [B, h, S, hd], scale 1/sqrt(hd)
        b, h, s, hd = o.shape
        o = o.permute(2, 0, 1, 3).reshape(s, b, h * hd)
        return self.to_out[1](self.to_out[0](o))


class GELUProj(nn.Module):  # "ff.net.0": Linear then tanh-GELU
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _GeluLinear(torch.autograd.Function):
    """a = tanh-GELU(pre); out = a @ w^T, saving only `pre` (and w): GELU is recomputed in backward
    (elementwise, no GEMM), so the 4D-wide GELU output is never kept. Same ops, same numbers."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(pre, w)
        ctx.has_bias = b is not None
        return F.linear(F.gelu(pre, approximate="tanh"), w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        pre, w = ctx.saved_tensors
        a = F.gelu(pre, approximate="tanh")
        g2 = g.reshape(-1, g.shape[-1])
        gw = g2.t() @ a.reshape(-1, a.shape[-1])
        gb = g2.sum(0) if ctx.has_bias else None
        return torch.ops.aten.gelu_backward(g @ w, pre, approximate="tanh"), gw, gb


def gelu_linear(pre: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(pre) @ w^T (+ b) without keeping GELU(pre) for backward (plain ops under torch.compile)."""
    if torch.compiler.is_compiling():
        return F.linear(F.gelu(pre, approximate="tanh"), w, b)
    return _GeluLinear.apply(pre, w, b)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, mult * dim), nn.Dropout(0.0), Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = cast(GELUProj, self.net[0]).proj(x)  # [S, B, 4D(/TP)] pre-activation
        out = self.net[2]
        fn = getattr(out, "forward_gelu_input", None)  # the TP plan's row-parallel linear
        if fn is not None:
            return fn(pre)
        lin = cast(Linear, out)  # no TP plan: the plain Linear
        return gelu_linear(pre, lin.weight.to(pre.dtype), lin.bias.to(pre.dtype))


class DiTBlock(nn.Module):
    """Upstream's BasicTransformerBlock with norm_type ada_norm_single, sequence-first."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.attn1 = Attention(d, d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias)
        self.attn2 = Attention(
            d, cfg.cross_attention_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias
        )
        self.ff = FeedForward(d)

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(
        self,
        h: torch.Tensor,  # [S, B, D]
        t6: torch.Tensor,  # [B, 6D]
        text: torch.Tensor,  # [L, B, D]
        text_bias: torch.Tensor | None,  # [B, 1, 1, L]
        rope: tuple[torch.Tensor, torch.Tensor],  # (cos, signed sin) [S, hd] in the activation dtype
        video_bias: torch.Tensor | None = None,  # [B, 1, 1, S]
    ) -> torch.Tensor:
        b, d = t6.shape[0], self.scale_shift_table.shape[-1]
        # [B,6D] -> [B,6,D] + table -> [6,B,D] -> [6,1,B,D]  (never reshape [B,6D] to [6,B,D] directly)
        mod = (t6.view(b, 6, d) + self.scale_shift_table.to(t6.dtype)[None]).permute(1, 0, 2).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # each [1, B, D]
        n = self._ln(h) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * self.attn1(n, bias=video_bias, rope=rope)
        h = h + self.attn2(h, context=text, bias=text_bias)
        n = self._ln(h) * (1 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.ff(n)


_T = TypeVar("_T")


def _identity(x: _T) -> _T:
    return x


_TensorHook = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
class OpenSoraT2V(nn.Module):
    # set by the parallel plans (osp.stage2_train.parallel / context_parallel); absent before
    _osp_layout: Any
    _osp_cp: bool

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.adaln_single = AdaLayerNormSingle(d)
        self.caption_projection = CaptionProjection(cfg.caption_channels, d)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = Linear(d, cfg.patch_size_t * cfg.patch_size**2 * cfg.out_channels)
        self.compute_dtype: torch.dtype | None = None  # None: the weights' dtype (or autocast's)
        self._rope_cache: dict = {}
        # identity at TP=1; osp.stage2_train.parallel.parallelize replaces them
        self.scatter_video: _TensorHook = _identity  # [S,B,D] -> this rank's sequence shard
        self.scatter_text: _TensorHook = _identity  # [L,B,D] -> this rank's text (osp keeps text replicated)
        self.t6_hook: _TensorHook = _identity  # [B,6D] before the blocks (SP: identity fwd, TP all-reduce bwd)
        self.gather_video: _TensorHook = _identity  # shard -> [S,B,D]
        # RopeTable of the full grid -> the table of this rank's positions (CP)
        self.scatter_rope: Callable[[RopeTable], RopeTable] = _identity

    # -- helpers -----------------------------------------------------------------------------
    def rope_table(self, grid: tuple[int, int, int], device) -> RopeTable:
        """fp32 cos/sin of a token grid, computed once per (grid, device) and reused."""
        cfg = self.config
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = RopeTable(
                rope_angles(
                    grid,
                    cfg.attention_head_dim,
                    cfg.interpolation_scales,
                    ROPE_THETA,
                    cfg.rope_table_cache_quirk,
                    device,
                )
            )
        return self._rope_cache[key]

    def activation_dtype(self, device_type: str) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.pos_embed.proj.weight.dtype

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, pt*p*p*C] ((pt, ph, pw, c) order, c fastest) -> [B, C, T, H, W]."""
        cfg, (t, hh, ww) = self.config, grid
        p, pt, c = cfg.patch_size, cfg.patch_size_t, cfg.out_channels
        x = x.reshape(x.shape[0], t, hh, ww, pt, p, p, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T, pt, H', p, W', p]
        return x.reshape(x.shape[0], c, t * pt, hh * p, ww * p)

    def _text_bias(self, text_mask: torch.Tensor | None, b: int, l: int, dtype, device) -> torch.Tensor | None:
        if text_mask is None:
            return None
        m = text_mask.reshape(b, l).to(device)
        return ((1 - m.to(dtype)) * MASK_BIAS).view(b, 1, 1, l)

    def _video_bias(self, video_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
        if video_mask is None:
            return None
        p = self.config.patch_size
        m = F.max_pool3d(video_mask.float()[:, None], kernel_size=(1, p, p), stride=(1, p, p))  # [B,1,T,H',W']
        m = m.flatten(1)  # [B, S]
        bias = (1 - (m > 0).to(dtype)) * MASK_BIAS
        if not bool((bias != 0).any()):
            return None  # upstream drops an all-valid mask
        return bias[:, None, None, :]

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,  # [B, 4, T, H, W] latents (scaled by VAE_SCALE_FACTOR)
        timestep: torch.Tensor,  # [B] int or float in [0, 1000)
        text: torch.Tensor,  # [B, L, Dtxt] (or [B, 1, L, Dtxt])
        text_mask: torch.Tensor | None = None,  # [B, L] (or [B, 1, L]) in {0, 1}
        video_mask: torch.Tensor | None = None,  # [B, T, H, W] latent resolution; None = all valid
    ) -> torch.Tensor:
        dev = x.device.type
        dtype = self.activation_dtype(dev)
        # every activation in `dtype`: autocast off inside (LayerNorm keeps bf16 I/O, fp32 statistics)
        off = torch.autocast(dev, enabled=False) if dev != "meta" and torch.is_autocast_enabled(dev) else nullcontext()
        with off:
            return self._forward(x.to(dtype), timestep, text.to(dtype), text_mask, video_mask, dtype)

    def _forward(self, x, timestep, text, text_mask, video_mask, dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        b, _, t, hh, ww = x.shape
        p = cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent H, W ({hh}, {ww}) must be multiples of the patch size {p}")
        grid = (t, hh // p, ww // p)
        if text.dim() == 4:
            text = text.squeeze(1)
        if timestep.dim() == 0:
            timestep = timestep.expand(b)
        h = self.pos_embed(x)  # [B, S, D]
        t6, embedded_t = self.adaln_single(timestep, dtype)  # [B, 6D], [B, D]
        txt = self.caption_projection(text)  # [B, L, D]
        text_bias = self._text_bias(text_mask, b, txt.shape[1], dtype, x.device)
        video_bias = self._video_bias(video_mask, dtype)
        rope = self.scatter_rope(self.rope_table(grid, x.device)).cos_sin(dtype)  # (cos, signed sin) [S(/CP), hd]

        h = self.scatter_video(h.transpose(0, 1).contiguous())  # [S(/TP), B, D]
        txt = self.scatter_text(txt.transpose(0, 1).contiguous())  # [L, B, D]
        t6 = self.t6_hook(t6)
        for block in self.transformer_blocks:
            h = block(h, t6, txt, text_bias, rope, video_bias)
        h = self.gather_video(h)  # [S, B, D]

        shift, scale = (
            (self.scale_shift_table.to(dtype)[None] + embedded_t[:, None]).permute(1, 0, 2).unsqueeze(1)
        )  # [1,B,D]
        h = F.layer_norm(h, h.shape[-1:], eps=cfg.norm_eps) * (1 + scale) + shift
        out = self.proj_out(h).transpose(0, 1)  # [B, S, pt*p*p*C]
        return self.unpatchify(out, grid)


def build_dit(preset_or_config: str | DiTConfig | dict | Path, device=None, dtype=None) -> OpenSoraT2V:
    """Build an OpenSoraT2V (random init) from a preset name, a DiTConfig, a dict or a config.json path.
    device="meta" builds without allocating (key/shape audits)."""
    cfg = get_dit_config(preset_or_config)
    with torch.device(device or "cpu"):
        model = OpenSoraT2V(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
