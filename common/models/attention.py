"""The self/cross-attention kernel of the DiT, chosen by one switch (`model.attention_backend`).

    auto   : CUDA -> SDPA in the priority order cuDNN, flash, mem-efficient, math;
             NPU  -> torch_npu.npu_fusion_attention; CPU -> SDPA (torch's own order: flash-cpu, math)
    cudnn | flash | efficient | math : that SDPA backend only (an error if it cannot run)
    fa3    : FlashAttention-3 on a Hopper GPU with its kernel package (`flash_attn_interface`) installed:
             torch's `activate_flash_attention_impl("FA3")` makes it SDPA's flash kernel, then SDPA runs in
             the order flash, cuDNN, mem-efficient, math (biased, text-masked calls go to cuDNN); a torch
             without that API calls `flash_attn_interface` directly for unbiased calls. Unavailable -> one-line error
    npu    : torch_npu.npu_fusion_attention (layout BNSD); no torch_npu -> one-line error

The backend context (`sdpa_kernel(..., set_priority=True)`) is entered inside `attention`, so under
`model.compile` dynamo traces it into each compiled block's graph and the chosen order holds there too.

`attention(q, k, v, bias)` takes q/k/v [B, h, S, hd] (after RoPE) and an additive bias
[B, 1, 1, S_kv] or None and returns [B, h, S, hd], scale 1/sqrt(hd). `resolve_backend` names the
kernel that will actually run for the training shapes (probing each candidate once); the trainer logs it
once at start, and `backend_in_use()` returns that name for the metrics.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from osp.common.errors import ConfigError, UnavailableError

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa3", "npu")
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_ORDER_CUDA = {"auto": ("cudnn", "flash", "efficient", "math"), "fa3": ("flash", "cudnn", "efficient", "math")}

# name: the switch; fa3: "sdpa" (torch's FA3 impl active) | "interface" (direct calls) | None; kernel: the probe's answer
_state: dict = {"name": "auto", "device": "cpu", "fa3": None, "kernel": None}


def _sdpa_ctx(names: tuple[str, ...]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, _SDPA[n]) for n in names]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # older torch: no priority argument (order is torch's own)
        return sdpa_kernel(backends)


def set_backend(name: str, device_type: str) -> None:
    if name not in BACKENDS:
        raise ConfigError(f"model.attention_backend = {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    _state.update(name=name, device=device_type)


def backend_in_use() -> str | None:
    """The kernel `resolve_backend` found for this process (None before it ran): for logs and metrics."""
    return _state["kernel"]


def _fa3():
    try:
        # FlashAttention-3 (hopper/ build of Dao-AILab/flash-attention): optional, absent on most machines
        import flash_attn_interface  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None
    return flash_attn_interface


def _activate_fa3(device: torch.device) -> str:
    """Make FlashAttention-3 the kernel of `attention`: "sdpa" (torch's FA3 impl behind SDPA's flash backend)
    or "interface" (direct calls). One-line UnavailableError when it cannot run here."""
    fix = 'install FlashAttention-3 (flash_attn_interface) on a Hopper GPU or set model.attention_backend = "auto"'
    if device.type != "cuda":
        raise UnavailableError(f"model.attention_backend = 'fa3' needs a CUDA GPU, not {device.type}; {fix}")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        raise UnavailableError(
            f"model.attention_backend = 'fa3' needs a Hopper GPU (compute capability 9.x), this one is {major}.{minor}; {fix}"
        )
    if _fa3() is None:
        raise UnavailableError(
            f"model.attention_backend = 'fa3': the package flash_attn_interface is not installed; {fix}"
        )
    try:
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError:  # torch before the flash-impl registry
        return "interface"
    activate_flash_attention_impl("FA3")
    return "sdpa"


def _deactivate_fa3() -> None:
    if _state["fa3"] == "sdpa":
        from torch.nn.attention import restore_flash_attention_impl

        restore_flash_attention_impl()
    _state["fa3"] = None


def _npu_attention(q, k, v, bias):
    import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports] (optional: Ascend only)

    mask = None if bias is None else (bias < 0).expand(-1, 1, q.shape[2], -1)  # True = masked out
    out = torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], "BNSD", atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1])
    )
    return out[0]


def _order(name: str, device_type: str) -> tuple[str, ...] | None:
    """The SDPA backends (in priority order) for the switch on this device; None = torch's own choice."""
    if device_type == "meta":
        return None
    if device_type == "cuda" and name in _ORDER_CUDA:
        return _ORDER_CUDA[name]
    return (name,) if name in _SDPA else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    name = _state["name"]
    if bias is not None:
        bias = bias.to(q.dtype)
    if name == "npu" or (name == "auto" and q.device.type == "npu"):
        return _npu_attention(q, k, v, bias)
    if name == "fa3" and _state["fa3"] == "interface" and bias is None and q.device.type == "cuda":
        fa3 = _fa3()
        assert fa3 is not None  # _state["fa3"] == "interface" only after _activate_fa3 imported it
        out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    order = _order(name, q.device.type)
    with nullcontext() if order is None else _sdpa_ctx(order):  # traced into compiled graphs as well
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def resolve_backend(
    name: str, device: torch.device, heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 256
) -> str:
    """The kernel that `attention` runs for unbiased [1, heads, tokens, head_dim] inputs in `dtype` on
    `device` (probed: the first candidate that runs); also kept for `backend_in_use()`. One-line error when a
    forced backend cannot run."""
    set_backend(name, device.type)
    _state["kernel"] = kernel = _resolve(name, device, heads, head_dim, dtype, tokens)
    return kernel


def _resolve(name: str, device: torch.device, heads: int, head_dim: int, dtype: torch.dtype, tokens: int) -> str:
    if name == "npu" or (name == "auto" and device.type == "npu"):
        try:
            import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports] (optional: Ascend only)
        except ImportError:
            raise UnavailableError(
                'model.attention_backend = "npu" needs torch_npu (Ascend); install it or set model.attention_backend = "auto"'
            ) from None
        return "npu_fusion_attention"
    if device.type == "meta":  # the dry run: no kernel runs, the switch is kept as given
        return f"{name} (not probed on meta)"
    if name == "fa3":
        _state["fa3"] = _activate_fa3(device)
        if _state["fa3"] == "interface":
            return "flash-attention-3 (flash_attn_interface; masked calls: sdpa)"
    elif _state["fa3"] is not None:
        _deactivate_fa3()
    candidates = _order(name, device.type) or ()
    if not candidates:
        return "sdpa (torch default for " + device.type + ")"
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
    for c in candidates:
        try:
            with _sdpa_ctx((c,)):
                F.scaled_dot_product_attention(q, q, q)
            return "sdpa:flash (FlashAttention-3)" if name == "fa3" and c == "flash" else f"sdpa:{c}"
        except RuntimeError:
            continue
    raise UnavailableError(
        f"model.attention_backend = {name!r} cannot run on {device.type} with head dim {head_dim} in {dtype}; "
        'set model.attention_backend = "auto"'
    )
