"""CausalVAE of Open-Sora Plan v1.2 ("CausalVAEModel_D4_4x8x8"): 8x8 spatial, 4x temporal compression.

Layout B, C, T, H, W throughout. T = 1 + 4k pixel frames <-> 1 + k latent frames; the first frame is
treated as a standalone image (causal padding replicates it, the upsamplers interpolate it only in
space). Module names equal the released state-dict keys (248 tensors for `osp12`), so the released
`vae/checkpoint.ckpt` or a diffusers-style safetensors file loads strictly.

GroupNorms applied to 5-D tensors pool their statistics over all frames of the clip (or of the
temporal chunk when tiling); inside the 2-D blocks of levels 0-1 frames are folded into the batch, so
those GroupNorms are per frame. The encoder is therefore causal in its convolutions but not
numerically causal as a whole.

Callers apply VAE_SCALE_FACTOR themselves: z_dit = 0.18215 * z_vae (training), z_vae = z_dit / 0.18215
(sampling, before `decode`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from osp.common.config import LATENT_CHANNELS, LOGVAR_CLAMP, TileConfig, read_config_json
from osp.common.errors import ConfigError, MissingFileError
from osp.common.hashing import sha256_file

PIXEL_CHANNELS = 3
GN_EPS = 1e-6
CONFIG_NAME = "config.json"
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@dataclass
class CausalVAEConfig:
    """Constructor arguments of upstream `CausalVAEModel` (= fields of the released config.json).

    Defaults are the v1.2 release values (not upstream's v1.1-style constructor defaults). Module
    classes are chosen by class-name strings, as upstream does. `norm_num_groups` is our own field
    (upstream hard-codes 32 groups, which rejects widths below 32); the released config lacks it and
    gets 32.
    """

    hidden_size: int = 128
    hidden_size_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    z_channels: int = LATENT_CHANNELS
    embed_dim: int = LATENT_CHANNELS
    double_z: bool = True
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    resolution: int = 256
    q_conv: str = "CausalConv3d"
    use_quant_layer: bool = True
    encoder_conv_in: str = "Conv2d"
    encoder_conv_out: str = "CausalConv3d"
    encoder_attention: str = "AttnBlock3DFix"
    encoder_resnet_blocks: list[str] = field(
        default_factory=lambda: ["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"]
    )
    encoder_spatial_downsample: list[str] = field(
        default_factory=lambda: ["Downsample", "Spatial2xTime2x3DDownsample", "Spatial2xTime2x3DDownsample", ""]
    )
    encoder_temporal_downsample: list[str] = field(default_factory=lambda: ["", "", "", ""])
    encoder_mid_resnet: str = "ResnetBlock3D"
    decoder_conv_in: str = "CausalConv3d"
    decoder_conv_out: str = "CausalConv3d"
    decoder_attention: str = "AttnBlock3DFix"
    decoder_resnet_blocks: list[str] = field(default_factory=lambda: ["ResnetBlock3D"] * 4)
    decoder_spatial_upsample: list[str] = field(
        default_factory=lambda: ["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample", "Spatial2xTime2x3DUpsample"]
    )
    decoder_temporal_upsample: list[str] = field(default_factory=lambda: ["", "", "", ""])
    decoder_mid_resnet: str = "ResnetBlock3D"
    norm_num_groups: int = 32  # osp extension, see the class docstring

    @classmethod
    def from_dict(cls, d: dict) -> "CausalVAEConfig":
        """Known fields only: diffusers bookkeeping (`_class_name` ...) and older-style extras
        (`loss_type`, `loss_params`, `lr`, ...) are ignored, as upstream ignores them."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        for f in dataclasses.fields(cfg):  # JSON gives lists; keep them lists (tuples compare unequal)
            v = getattr(cfg, f.name)
            if isinstance(v, tuple):
                setattr(cfg, f.name, list(v))
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "CausalVAEConfig":
        d = read_config_json(path, "VAE", "pass the VAE folder holding a valid config.json (CausalVAEModel arguments)")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return {"_class_name": "CausalVAEModel", **dataclasses.asdict(self)}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def sha256(self) -> str:
        """Hash of the architecture-defining fields (canonical JSON)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


VAE_PRESETS: dict[str, CausalVAEConfig] = {
    # The released v1.2 VAE: widths 128/256/512/512, 239,189,991 parameters.
    "osp12": CausalVAEConfig(),
    # The same structure at 1/8 of the width (16/32/64/64) with 4 GroupNorm groups, so every group
    # spans as many channels as in osp12 (4 ... 16). Encodes a 9x64x64 clip in a fraction of a second
    # on CPU. Our own preset; not buildable by upstream (it hard-codes 32 groups).
    "tiny": CausalVAEConfig(hidden_size=16, hidden_size_mult=[1, 2, 4, 4], norm_num_groups=4),
}


# ------------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------------
def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x); in place when no graph is being recorded (halves peak memory in inference)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def frames_to_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t


def batch_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class GroupNorm(nn.GroupNorm):
    """GroupNorm(groups, eps=1e-6, affine). On [B, C, T, H, W] its statistics span all T frames."""

    def __init__(self, channels: int, groups: int):
        if channels % groups:
            raise ConfigError(
                f"GroupNorm: {channels} channels are not divisible by norm_num_groups={groups}; fix the VAE config"
            )
        super().__init__(groups, channels, eps=GN_EPS, affine=True)


class CausalConv3d(nn.Module):
    """Conv3d with causal time padding: the first frame is repeated kt-1 times in front, nothing at the
    back; the time component of `padding` is forced to 0 (spatial padding is the conv's zero padding).
    T_out = (T - 1) // st + 1. Keys: <name>.conv.weight [cout, cin, kt, kh, kw], <name>.conv.bias."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        k, s, p = _triple(kernel_size), _triple(stride), _triple(padding)
        self.time_kernel = k[0]
        self.conv = nn.Conv3d(cin, cout, k, stride=s, padding=(0, p[1], p[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        if self.time_kernel > 1:
            first = x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1)
            x = torch.cat([first, x], dim=2)  # [B, C, kt-1+T, H, W]
        return self.conv(x)


class Conv2d(nn.Conv2d):
    """Plain 2-D conv applied to every frame (frames folded into the batch). Keys: <name>.weight/.bias."""

    def __init__(self, cin: int, cout: int, kernel_size=3, stride=1, padding=1):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        y, t = frames_to_batch(x)
        return batch_to_frames(super().forward(y), t)


class ResnetBlock2D(nn.Module):
    """Per frame: h = conv2(drop(silu(norm2(conv1(silu(norm1(x))))))); out = shortcut(x) + h."""

    def __init__(self, cin: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        x, t = frames_to_batch(x)  # GroupNorms below are per frame
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return batch_to_frames(x + h, t)


class ResnetBlock3D(nn.Module):
    """Same formula on the whole clip: causal 3x3x3 convs, GroupNorms pooled over frames."""

    def __init__(self, cin: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(cin, groups)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = CausalConv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """2-D, per frame: zero-pad right/bottom by 1, 3x3 conv stride 2 -> H/2, W/2; T unchanged."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, t = frames_to_batch(x)
        return batch_to_frames(self.conv(F.pad(y, (0, 1, 0, 1))), t)


class Spatial2xTime2x3DDownsample(nn.Module):
    """Zero-pad W and H right/bottom by 1, causal 3x3x3 conv stride 2: [C, T, H, W] -> [C, (T-1)//2+1, H/2, W/2]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 0)))


class SpatialUpsample2x(nn.Module):
    """Nearest x2 in H and W per frame, then a (1,3,3) causal conv (weight [c, c, 1, 3, 3])."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (1, 3, 3), stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, t = frames_to_batch(x)
        y = F.interpolate(y, scale_factor=(2, 2), mode="nearest")
        return self.conv(batch_to_frames(y, t))


class Spatial2xTime2x3DUpsample(nn.Module):
    """First frame: trilinear (1,2,2); frames 1..T-1: trilinear (2,2,2) -> T' = 2T-1; then a causal 3x3x3 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="trilinear")
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="trilinear")
            first = torch.cat([first, rest], dim=2)
        return self.conv(first)


class AttnBlock3DFix(nn.Module):
    """Single-head spatial self-attention per frame (v1.2 semantics): tokens = H*W of one frame,
    features = C; scale C^-1/2; residual. GroupNorm pooled over frames; q/k/v/proj_out are k=1 convs."""

    fix = True

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(c, groups)
        self.q = CausalConv3d(c, c, 1)
        self.k = CausalConv3d(c, c, 1)
        self.v = CausalConv3d(c, c, 1)
        self.proj_out = CausalConv3d(c, c, 1)

    def _tokens(self, y: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = y.shape
        if self.fix:  # [B, C, T, H, W] -> [B*T, H*W, C]
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        # upstream's non-Fix reshape [B, C, T, H, W] -> [B*T, C, H*W] without moving T: mixes C and T
        return y.reshape(b * t, c, h * w).transpose(1, 2)

    def _untokens(self, o: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, t, h, w = shape
        if self.fix:
            return o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return o.transpose(1, 2).reshape(b, c, t, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        h = self.norm(x)
        q, k, v = (self._tokens(m(h)) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B*T, HW, C]
        return x + self.proj_out(self._untokens(o, x.shape))


class AttnBlock3D(AttnBlock3DFix):
    """Upstream's non-Fix variant (same parameters, wrong reshape). Not used by v1.2; kept so that a
    config naming it builds and so tests can show the two variants differ."""

    fix = False


_CONV_CLASSES = {"Conv2d": Conv2d, "CausalConv3d": CausalConv3d}
_RESNET_CLASSES = {"ResnetBlock2D": ResnetBlock2D, "ResnetBlock3D": ResnetBlock3D}
_ATTN_CLASSES = {"AttnBlock3DFix": AttnBlock3DFix, "AttnBlock3D": AttnBlock3D}
_DOWN_CLASSES = {"Downsample": Downsample, "Spatial2xTime2x3DDownsample": Spatial2xTime2x3DDownsample}
_UP_CLASSES = {"SpatialUpsample2x": SpatialUpsample2x, "Spatial2xTime2x3DUpsample": Spatial2xTime2x3DUpsample}


def _cls(table: dict, name: str, what: str):
    short = name.rsplit(".", 1)[-1]  # tolerate dotted module paths
    if short not in table:
        raise ConfigError(f"VAE config: {what} = {name!r} is not supported; use one of {sorted(table)}")
    return table[short]


# ------------------------------------------------------------------------------------------------
# encoder / decoder
# ------------------------------------------------------------------------------------------------
class _Level(nn.Module):
    """One resolution level: `block` (res blocks), `attn` (empty in v1.2), optional down/upsample."""


class Encoder(nn.Module):
    """[B, 3, T, H, W] -> [B, 2*z, (T-1)//4+1, H/8, W/8] (before quant_conv)."""

    down: Any  # ModuleList of _Level (attributes set per level: block, attn, downsample)
    mid: Any  # block_1, attn_1, block_2

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        g, n = cfg.norm_num_groups, len(cfg.hidden_size_mult)
        for name in ("encoder_resnet_blocks", "encoder_spatial_downsample", "encoder_temporal_downsample"):
            if len(getattr(cfg, name)) != n:
                raise ConfigError(f"VAE config: {name} needs {n} entries (one per hidden_size_mult level)")
        if any(cfg.encoder_temporal_downsample):
            raise ConfigError('VAE config: separate temporal downsample modules are not part of v1.2; use "" entries')
        self.conv_in = _cls(_CONV_CLASSES, cfg.encoder_conv_in, "encoder_conv_in")(
            PIXEL_CHANNELS, cfg.hidden_size, 3, stride=1, padding=1
        )
        attn_cls = _cls(_ATTN_CLASSES, cfg.encoder_attention, "encoder_attention")
        widths_in = [cfg.hidden_size] + [cfg.hidden_size * m for m in cfg.hidden_size_mult]
        res = cfg.resolution
        self.down = nn.ModuleList()
        c = cfg.hidden_size
        for i in range(n):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_cls = _cls(_RESNET_CLASSES, cfg.encoder_resnet_blocks[i], f"encoder_resnet_blocks[{i}]")
            c, c_out = widths_in[i], cfg.hidden_size * cfg.hidden_size_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(block_cls(c, c_out, cfg.dropout, g))
                c = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(attn_cls(c, g))
            if cfg.encoder_spatial_downsample[i]:
                level.downsample = _cls(
                    _DOWN_CLASSES, cfg.encoder_spatial_downsample[i], f"encoder_spatial_downsample[{i}]"
                )(c, c)
                res //= 2
            self.down.append(level)
        mid_cls = _cls(_RESNET_CLASSES, cfg.encoder_mid_resnet, "encoder_mid_resnet")
        self.mid = nn.Module()
        self.mid.block_1 = mid_cls(c, c, cfg.dropout, g)
        self.mid.attn_1 = attn_cls(c, g)
        self.mid.block_2 = mid_cls(c, c, cfg.dropout, g)
        self.norm_out = GroupNorm(c, g)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = _cls(_CONV_CLASSES, cfg.encoder_conv_out, "encoder_conv_out")(c, z_out, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z, t, h, w] (after post_quant_conv) -> [B, 3, 4(t-1)+1, 8h, 8w]. `up.<i>` is level i;
    execution runs i = n-1 ... 0."""

    up: Any  # ModuleList of _Level (attributes set per level: block, attn, upsample)
    mid: Any  # block_1, attn_1, block_2

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        g, n = cfg.norm_num_groups, len(cfg.hidden_size_mult)
        for name in ("decoder_resnet_blocks", "decoder_spatial_upsample", "decoder_temporal_upsample"):
            if len(getattr(cfg, name)) != n:
                raise ConfigError(f"VAE config: {name} needs {n} entries (one per hidden_size_mult level)")
        if any(cfg.decoder_temporal_upsample):
            raise ConfigError('VAE config: separate temporal upsample modules are not part of v1.2; use "" entries')
        attn_cls = _cls(_ATTN_CLASSES, cfg.decoder_attention, "decoder_attention")
        c = cfg.hidden_size * cfg.hidden_size_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = _cls(_CONV_CLASSES, cfg.decoder_conv_in, "decoder_conv_in")(
            cfg.z_channels, c, 3, stride=1, padding=1
        )
        mid_cls = _cls(_RESNET_CLASSES, cfg.decoder_mid_resnet, "decoder_mid_resnet")
        self.mid = nn.Module()
        self.mid.block_1 = mid_cls(c, c, cfg.dropout, g)
        self.mid.attn_1 = attn_cls(c, g)
        self.mid.block_2 = mid_cls(c, c, cfg.dropout, g)
        levels = []
        for i in reversed(range(n)):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_cls = _cls(_RESNET_CLASSES, cfg.decoder_resnet_blocks[i], f"decoder_resnet_blocks[{i}]")
            c_out = cfg.hidden_size * cfg.hidden_size_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(block_cls(c, c_out, cfg.dropout, g))
                c = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(attn_cls(c, g))
            if cfg.decoder_spatial_upsample[i]:
                level.upsample = _cls(_UP_CLASSES, cfg.decoder_spatial_upsample[i], f"decoder_spatial_upsample[{i}]")(
                    c, c
                )
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm(c, g)
        self.conv_out = _cls(_CONV_CLASSES, cfg.decoder_conv_out, "decoder_conv_out")(
            c, PIXEL_CHANNELS, 3, stride=1, padding=1
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------
# posterior
# ------------------------------------------------------------------------------------------------
class DiagonalGaussian:
    """Posterior from moments [B, 2*C, ...]: mean = first C channels, logvar = last C, clamped to
    LOGVAR_CLAMP; sample() = mean + std * eps with eps ~ N(0, 1) drawn in fp32 on the generator's
    device (CPU by default, as upstream) and moved to the moments' device."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_CLAMP)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
class CausalVAE(nn.Module):
    """encoder -> quant_conv -> moments; post_quant_conv -> decoder. Unscaled latents."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_layer:
            q = _cls(_CONV_CLASSES, cfg.q_conv, "q_conv")
            self.quant_conv = q(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = q(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.conv.weight.device

    # raw maps used by the tiling code (one tile / one chunk each)
    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.use_quant_layer else h

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.use_quant_layer:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_moments(self, video: torch.Tensor, tiling: TileConfig | None = None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] (H, W multiples of 8) -> moments [B, 8, 1+k, H/8, W/8].
        With `tiling`, tiles when the clip exceeds a tile (upstream's trigger); see vae_tiling."""
        if video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
            raise ValueError(f"encode_moments: expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % 4 or h % 8 or w % 8:
            raise ValueError(
                f"encode_moments: need T = 1+4k and H, W multiples of 8, got T={t} H={h} W={w}; crop or resize the clip"
            )
        video = video.to(dtype=self.dtype)
        if tiling is not None:
            from osp.common.models.vae_tiling import needs_tiling_encode, tiled_encode

            if needs_tiling_encode(video.shape, tiling):
                return tiled_encode(video, self._encode_tile, tiling)
        return self._encode_tile(video)

    def encode(self, video: torch.Tensor, tiling: TileConfig | None = None) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(video, tiling))

    def decode(self, z: torch.Tensor, tiling: TileConfig | None = None) -> torch.Tensor:
        """z [B, 4, 1+k, h, w] (unscaled VAE latent) -> video [B, 3, 1+4k, 8h, 8w] (not clamped)."""
        if z.ndim != 5 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"decode: expected latent [B, {self.config.embed_dim}, t, h, w], got {tuple(z.shape)}")
        z = z.to(dtype=self.dtype)
        if tiling is not None:
            from osp.common.models.vae_tiling import needs_tiling_decode, tiled_decode

            if needs_tiling_decode(z.shape, tiling):
                return tiled_decode(z, self._decode_tile, tiling)
        return self._decode_tile(z)


def build_vae(preset_or_config: str | CausalVAEConfig, device=None, dtype=None) -> CausalVAE:
    """A randomly initialised CausalVAE from a preset name, a config or a config.json path (eval mode)."""
    if isinstance(preset_or_config, CausalVAEConfig):
        cfg = preset_or_config
    elif preset_or_config in VAE_PRESETS:
        cfg = dataclasses.replace(VAE_PRESETS[preset_or_config])
    elif str(preset_or_config).endswith(".json") or Path(preset_or_config).is_dir():
        p = Path(preset_or_config)
        cfg = CausalVAEConfig.from_json(p / CONFIG_NAME if p.is_dir() else p)
    else:
        raise ConfigError(
            f"unknown VAE preset {preset_or_config!r}; choose one of {sorted(VAE_PRESETS)} or a config.json"
        )
    model = CausalVAE(cfg)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def weight_file(path: str | Path) -> Path:
    """The weight file of a VAE folder, chosen as upstream does: the last `*.ckpt` (sorted) if any,
    else diffusion_pytorch_model.safetensors, else model.safetensors. A file path is returned as is."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise MissingFileError(
            f"{p}: no such VAE folder; pass a folder with config.json and checkpoint.ckpt or *.safetensors"
        )
    ckpts = sorted(p.glob("*.ckpt"))
    if ckpts:
        return ckpts[-1]
    for name in SAFETENSORS_NAMES:
        if (p / name).is_file():
            return p / name
    raise MissingFileError(
        f"{p}: no *.ckpt, {' or '.join(SAFETENSORS_NAMES)} in the VAE folder; copy the weights there"
    )


def _config_path(path: str | Path) -> Path:
    p = Path(path)
    return (p.parent if p.is_file() else p) / CONFIG_NAME


def _select_ckpt_state(obj, file: Path, ema) -> dict:
    """Upstream `init_from_ckpt` selection with an explicit `ema` instead of NOT_USE_EMA_MODEL."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{file}: checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    ema_sd = obj.get("ema_state_dict")
    has_ema = isinstance(ema_sd, dict) and len(ema_sd) > 0
    if ema is True and not has_ema:
        raise ConfigError(
            f"{file}: ema=True but the checkpoint has no non-empty ema_state_dict; use ema='auto' or False"
        )
    if has_ema and ema in ("auto", True):
        return {k.replace("module.", ""): v for k, v in dict(ema_sd or {}).items()}
    if "state_dict" in obj:
        sd = obj["state_dict"]
        return sd["gen_model"] if isinstance(sd, dict) and "gen_model" in sd else sd
    return obj


def _read_state_dict(file: Path, ema) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except SafetensorError as e:
            raise ConfigError(
                f"{file}: not a readable safetensors file ({e}); re-download or re-save the VAE weights"
            ) from None
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise ConfigError(
            f"{file}: checkpoint holds objects other than plain tensors/containers and was refused "
            f"(weights_only load: {first}); convert it to safetensors in a trusted environment"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ConfigError(
            f"{file}: not a readable torch checkpoint ({str(e).splitlines()[0]}); re-download the VAE weights"
        ) from None
    return _select_ckpt_state(obj, file, ema)


def load_state_dict_strict(model: nn.Module, sd: dict, file: Path | str) -> None:
    """Strict load: unexpected keys containing "loss" are ignored (upstream); any other missing or
    unexpected key, non-tensor value or shape mismatch raises one error listing them all."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k not in own and "loss" in k)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [
        f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
        if isinstance(sd[k], torch.Tensor)
        else f"{k} is a {type(sd[k]).__name__}"
        for k in sorted(set(sd) & set(own))
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad_shape)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ConfigError(
            f"{file}: weights do not match the VAE config ({'; '.join(problems)}); check config.json and the weight file belong together"
        )
    model.load_state_dict(sd, strict=True)


def load_vae(path: str | Path, ema="auto", device=None, dtype=None) -> CausalVAE:
    """Load a VAE folder (config.json + checkpoint.ckpt or diffusion_pytorch_model.safetensors /
    model.safetensors), strictly. `ema`: "auto" = the checkpoint's ema_state_dict when non-empty
    (upstream default), True = require it, False = state_dict["gen_model"] / state_dict."""
    if ema not in ("auto", True, False):
        raise ValueError(f"load_vae: ema must be 'auto', True or False, got {ema!r}")
    file = weight_file(path)
    model = CausalVAE(CausalVAEConfig.from_json(_config_path(path)))
    load_state_dict_strict(model, _read_state_dict(file, ema), file)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def save_vae(model: CausalVAE, out_dir: str | Path) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (loadable by load_vae and upstream)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json(out / CONFIG_NAME)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / SAFETENSORS_NAMES[0]), metadata={"format": "pt"})
    return out


def vae_identity(path: str | Path) -> dict:
    """Identity of a VAE folder for shard manifests: weight file name + sha256, config sha256."""
    file = weight_file(path)
    cfg = CausalVAEConfig.from_json(_config_path(path))
    return {
        "class": "CausalVAEModel_D4_4x8x8",
        "weights_file": file.name,
        "weights_sha256": sha256_file(file),
        "config_sha256": cfg.sha256(),
        "hidden_size": cfg.hidden_size,
        "hidden_size_mult": list(cfg.hidden_size_mult),
    }


def read_clip_for_vae(path: str | Path, max_frames: int = 17, max_side: int = 256):
    """First frames of a video as uint8 [T, H, W, 3] ready for the VAE (for `osp vae roundtrip`):
    T = the largest 1 + 4k <= min(max_frames, length); the short side resized to at most `max_side`
    (bilinear, antialiased), then H and W centre-cropped to multiples of 8."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such video file")
    try:
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        n = min(max_frames, len(vr))
        n = (n - 1) // 4 * 4 + 1 if n >= 1 else 0
        if n < 1:
            raise ConfigError(f"{path}: the video has no frames")
        frames = vr.get_batch(list(range(n))).asnumpy()  # [T, H, W, 3] uint8
    except (RuntimeError, decord.DECORDError) as e:  # DECORDError is not a RuntimeError
        raise ConfigError(
            f"{path}: decord cannot read this video ({str(e).splitlines()[0][:200]}); re-encode it as H.264 mp4"
        ) from None
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[2:]
    scale = min(1.0, max_side / min(h, w))
    if scale < 1.0:
        h, w = max(8, round(h * scale)), max(8, round(w * scale))
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    h8, w8 = h // 8 * 8, w // 8 * 8
    if h8 < 8 or w8 < 8:
        raise ConfigError(f"{path}: frames of {h}x{w} px are too small for the VAE (need at least 8x8)")
    top, left = (h - h8) // 2, (w - w8) // 2
    x = x[:, :, top : top + h8, left : left + w8]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__: Sequence[str] = [
    "CausalVAEConfig",
    "VAE_PRESETS",
    "build_vae",
    "CausalVAE",
    "DiagonalGaussian",
    "load_vae",
    "save_vae",
    "vae_identity",
    "weight_file",
    "Encoder",
    "Decoder",
    "CausalConv3d",
    "AttnBlock3DFix",
    "AttnBlock3D",
    "count_parameters",
    "read_clip_for_vae",
]
