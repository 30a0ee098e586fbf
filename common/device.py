"""Device selection: cuda -> nccl, npu (torch_npu) -> hccl, cpu -> gloo; autocast dtype; seeding.

`meta` is the dry run's device (`osp train --dry-run`): tensors have shapes and dtypes but no data,
and its process group is torch's fake backend, which, like nccl and hccl, refuses CPU tensors.
Every collective takes tensors on `Device.torch_device()`, the communication device of its group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from osp.common.errors import ConfigError, UnavailableError

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo", "meta": "meta:fake"}


@lru_cache(maxsize=1)
def npu_available() -> bool:
    """True when torch_npu imports and sees a device. Never imported at module top level: without
    CANN, a torch_npu install breaks imports (ImportError/OSError/RuntimeError), so guard all three."""
    try:
        import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports]
    except (ImportError, OSError, RuntimeError):
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())  # pyright: ignore[reportAttributeAccessIssue]


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" | "npu" | "cpu" | "meta" (dry run)

    @property
    def backend(self) -> str:
        return BACKENDS[self.type]

    @property
    def is_accelerator(self) -> bool:
        return self.type in ("cuda", "npu")

    @property
    def is_meta(self) -> bool:
        return self.type == "meta"

    @property
    def autocast_dtype(self) -> torch.dtype:
        """bf16 on accelerators (upstream recipe), fp32 on CPU (exact tests)."""
        return torch.bfloat16 if self.is_accelerator else torch.float32

    @property
    def stats_dtype(self) -> torch.dtype:
        """dtype of the trainer's loss sums and agreement flags (device tensors that meet a collective):
        float64 where the backend reduces it, float32 on Ascend (HCCL and the cube units are float32-first)."""
        return torch.float32 if self.type == "npu" else torch.float64

    def torch_device(self, local_rank: int | None = None) -> torch.device:
        if self.type in ("cpu", "meta"):
            return torch.device(self.type)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(self.type, local_rank)

    def set_current(self, local_rank: int | None = None) -> torch.device:
        dev = self.torch_device(local_rank)
        if self.type == "cuda":
            torch.cuda.set_device(dev)
        elif self.type == "npu":
            torch.npu.set_device(dev)  # pyright: ignore[reportAttributeAccessIssue]
        return dev

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()
        elif self.type == "npu":
            torch.npu.synchronize()  # pyright: ignore[reportAttributeAccessIssue]

    def max_memory_allocated(self) -> int:
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.type == "npu":
            return torch.npu.max_memory_allocated()  # pyright: ignore[reportAttributeAccessIssue]
        return 0


def pick_device(prefer: str | None = None) -> Device:
    """Pick the device: `prefer` ("cuda", "npu", "cpu" or "auto"/None; env OSP_DEVICE) else the best
    available. Asking for an accelerator that is absent is an error, not a silent CPU fallback."""
    prefer = (prefer or os.environ.get("OSP_DEVICE") or "auto").lower()
    if prefer == "auto":
        if torch.cuda.is_available():
            return Device("cuda")
        if npu_available():
            return Device("npu")
        return Device("cpu")
    if prefer not in BACKENDS:
        raise ConfigError(f"unknown device {prefer!r}; use one of auto, cuda, npu, cpu (meta: osp train --dry-run)")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    if prefer == "npu" and not npu_available():
        raise UnavailableError(
            "--device npu requested but torch_npu is not usable; pip install 'osp[npu]' with CANN, or use --device cpu"
        )
    return Device(prefer)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
