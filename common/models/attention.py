"""The self/cross-attention kernel of the DiT, chosen by one switch (`model.attention_backend`).

    auto   : CUDA -> SDPA restricted to the priority order cuDNN, flash, mem-efficient, math;
             NPU  -> torch_npu.npu_fusion_attention; CPU -> SDPA (math / flash-cpu)
    cudnn | flash | efficient | math : that SDPA backend only (an error if it cannot run)
    fa3    : FlashAttention-3 (`flash_attn_interface`, Hopper) when installed, for unbiased calls;
             biased (text-masked) calls fall back to SDPA
    npu    : torch_npu.npu_fusion_attention (layout BNSD)

Under `model.compile` the backend context is left out of the compiled graph, so compiled blocks
use SDPA's own priority order (the trainer's log says so).

`attention(q, k, v, bias)` takes q/k/v [B, h, S, hd] (after RoPE) and an additive bias
[B, 1, 1, S_kv] or None and returns [B, h, S, hd], scale 1/sqrt(hd). `resolve_backend` names the
kernel that will actually run for the training shapes (probing each candidate once), so the trainer
logs it once at start.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa3", "npu")
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_AUTO_CUDA = ("cudnn", "flash", "efficient", "math")

_state = {"name": "auto", "device": "cpu"}


def _sdpa_ctx(names: tuple[str, ...]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, _SDPA[n]) for n in names]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # older torch: no priority argument (order is torch's own)
        return sdpa_kernel(backends)


def set_backend(name: str, device_type: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend = {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    _state.update(name=name, device=device_type)


def _fa3():
    try:
        # FlashAttention-3 (hopper/ build of Dao-AILab/flash-attention): optional, absent on most machines
        import flash_attn_interface  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None
    return flash_attn_interface


def _npu_attention(q, k, v, bias):
    import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports] (optional: Ascend only)

    mask = None if bias is None else (bias < 0).expand(-1, 1, q.shape[2], -1)  # True = masked out
    out = torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], "BNSD", atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1])
    )
    return out[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    name = _state["name"]
    if bias is not None:
        bias = bias.to(q.dtype)
    if name == "npu" or (name == "auto" and q.device.type == "npu"):
        return _npu_attention(q, k, v, bias)
    if name == "fa3" and bias is None and q.device.type == "cuda":
        fa3 = _fa3()
        if fa3 is not None:
            out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
    ctx = nullcontext()
    if torch.compiler.is_compiling():
        pass  # compiled blocks: no backend context inside the graph (SDPA's own order applies)
    elif q.device.type == "cuda" and name in ("auto", "fa3"):
        ctx = _sdpa_ctx(_AUTO_CUDA)
    elif name in _SDPA and q.device.type != "meta":
        ctx = _sdpa_ctx((name,))
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def resolve_backend(
    name: str, device: torch.device, heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 256
) -> str:
    """The kernel that `attention` runs for unbiased [1, heads, tokens, head_dim] inputs in `dtype` on
    `device` (probed: the first candidate that runs). One-line error when a forced backend cannot run."""
    set_backend(name, device.type)
    if name == "npu" or (name == "auto" and device.type == "npu"):
        return "npu_fusion_attention"
    if name == "fa3":
        if device.type == "cuda" and _fa3() is not None:
            return "flash-attention-3"
        name = "auto"
    candidates = _AUTO_CUDA if (name == "auto" and device.type == "cuda") else ((name,) if name in _SDPA else ())
    if not candidates:
        return "sdpa (torch default for " + device.type + ")"
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
    for c in candidates:
        try:
            with _sdpa_ctx((c,)):
                F.scaled_dot_product_attention(q, q, q)
            return f"sdpa:{c}"
        except RuntimeError:
            continue
    raise ValueError(
        f"model.attention_backend = {name!r} cannot run on {device.type} with head dim {head_dim} in {dtype}; "
        'set model.attention_backend = "auto"'
    )
