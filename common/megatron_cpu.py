"""The megatron-core CPU shim: lets megatron-core 0.16.1 tensor/sequence parallelism run on CPU + gloo.

megatron-core hard-codes CUDA in a few places that its TP/SP layers reach on every call:
`torch.cuda.current_device()` (all-gather / reduce-scatter buffers, the global memory buffer), the
CUDA RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`), and
`torch.cuda.synchronize()` (dist_checkpointing). `apply()` redirects exactly those entry points to
their CPU equivalents. It does nothing when an accelerator is present, and is idempotent.

The patched names are private to megatron-core, which is why pyproject pins megatron-core exactly.
"""

from __future__ import annotations

import torch

from osp.common.errors import UnavailableError

PINNED_MEGATRON_CORE = "0.16.1"
_applied = False
_originals: dict = {}
_current_device = "cpu"  # what megatron's torch.cuda.current_device() answers: "cpu", or "meta" in a dry run


def use_device(device: str) -> None:
    """Where megatron allocates its communication buffers under the shim ("meta" for `osp train --dry-run`)."""
    global _current_device
    _current_device = device


def needed() -> bool:
    from .device import npu_available

    return not torch.cuda.is_available() and not npu_available()


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU. Returns True if the shim is (now) active."""
    global _applied
    if _applied:
        return True
    if not force and not needed():
        return False
    import megatron.core
    import megatron.core.tensor_parallel.random as mrandom

    if megatron.core.__version__ != PINNED_MEGATRON_CORE:
        raise UnavailableError(
            f"osp's CPU shim targets megatron-core {PINNED_MEGATRON_CORE}, found {megatron.core.__version__}; "
            f"pip install megatron-core=={PINNED_MEGATRON_CORE}"
        )
    _originals.update(
        {
            (torch.cuda, n): getattr(torch.cuda, n)
            for n in ("current_device", "get_rng_state", "set_rng_state", "manual_seed", "synchronize")
        }
    )
    _originals.update({(mrandom, n): getattr(mrandom, n) for n in ("_get_cuda_rng_state", "_set_cuda_rng_state")})
    torch.cuda.current_device = lambda: _current_device
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.synchronize = lambda *a, **k: None
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _applied = True
    return True


def undo() -> None:
    """Restore what `apply` patched (the dry run forces the shim on a machine with an accelerator, then undoes it)."""
    global _applied
    for (owner, name), fn in _originals.items():
        setattr(owner, name, fn)
    _originals.clear()
    _applied = False


def is_applied() -> bool:
    return _applied
