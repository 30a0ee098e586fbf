"""Process group + megatron-core parallel state for stage 2, handed to the rest as one `Layout`
(`osp.stage2_train.layout`: sizes, ranks and process groups). megatron's layers read its global
parallel state themselves; osp code reads the Layout that `init_parallel` returns.

Launch: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment) or a
plain `python -m osp.stage2_train.run` (one process, an in-memory store). The backend comes from the
device layer (cuda -> nccl, npu -> hccl, cpu -> gloo). Reaching MASTER_ADDR is bounded by
`parallel.init_timeout_s`; a failure is one line naming the address and the fix.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from osp.common import megatron_cpu
from osp.common.device import Device, pick_device
from osp.common.errors import UnavailableError
from osp.common.quiet import quiet_device_warnings
from osp.stage2_train.layout import Layout, LayoutError, check_layout, check_sample_layout
from osp.stage2_train.parallel import parallelize


def _parallel_state():
    """megatron's parallel_state, imported once the CPU shim is in place (a no-op with an accelerator)."""
    megatron_cpu.apply()
    from megatron.core import parallel_state

    return parallel_state


def _check_master_reachable(addr: str, port: int, timeout: float) -> None:
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as e:
        raise UnavailableError(
            f"MASTER_ADDR={addr!r} does not resolve ({e.strerror}); set MASTER_ADDR to the IP of the node with NODE_RANK=0"
        ) from None


def init_distributed(device: Device, timeout_s: float = 300.0) -> tuple[int, int, int]:
    """Initialise torch.distributed once; returns (rank, world, local_rank)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        store = dist.HashStore()  # pyright: ignore[reportPrivateImportUsage]
        dist.init_process_group(device.backend, store=store, rank=0, world_size=1, timeout=timeout)
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    _check_master_reachable(addr, port, timeout_s)
    if device.is_accelerator:
        device.set_current(local_rank)
    try:
        dist.init_process_group(device.backend, rank=rank, world_size=world, timeout=timeout)
        # a first collective proves every rank is there (bounded by the same timeout)
        t = torch.ones(1, device=device.torch_device(local_rank))
        dist.all_reduce(t)
    except (RuntimeError, TimeoutError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnavailableError(
            f"rank {rank}/{world}: could not join the process group at MASTER_ADDR={addr}:{port} within {timeout_s:.0f} s "
            f"({first}); check MASTER_ADDR/MASTER_PORT point at the NODE_RANK=0 node and every node was started"
        ) from None
    return rank, world, local_rank


def init_fake(world: int, rank: int) -> None:
    """The dry run's process group: torch's fake backend for `world` ranks seen from `rank`, in this one
    process. Collectives return at once and accept only `meta` tensors: a CPU tensor raises the same
    "No backend type associated with device type cpu" as nccl/hccl, so the dry run catches that bug class."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world < 1 or not 0 <= rank < world:
        raise LayoutError(f"--rank {rank} is outside --world {world}; pick a rank in [0, {world - 1}]")
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("meta:fake", store=FakeStore(), rank=rank, world_size=world)


def init_parallel(tp: int, sp: bool, heads: int, tokens: int | None, timeout_s: float = 300.0, cp: int = 1) -> Layout:
    """(Re)initialise megatron-core's parallel state for these TP / CP sizes (world must already be up);
    returns the Layout every other part receives."""
    ps = _parallel_state()
    world = dist.get_world_size()
    check_layout(world, tp, sp, heads, tokens, cp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        create_gloo_process_groups=dist.get_backend() not in ("gloo", "meta:fake"),  # meta:fake: the dry run's group
    )
    return current_layout(sp)


def current_layout(sp: bool) -> Layout:
    """The Layout of megatron's current parallel state (initialised by `init_parallel` or directly)."""
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel_state is not initialised; call osp.stage2_train.dist.init_parallel first")
    return Layout(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp=ps.get_tensor_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),  # excludes CP: the loader's rank
        sp=sp,
        cp=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


def accelerator_env(device_type: str) -> dict[str, str]:
    """Environment megatron's TP/SP communication overlap needs on accelerators: one hardware queue
    (CUDA_DEVICE_MAX_CONNECTIONS=1) so that a collective launched before a GEMM runs before it.
    Must be set before the device context exists; empty on CPU."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if device_type in ("cuda", "npu") else {}


def shutdown() -> None:
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_device(name: str) -> Device:
    device = pick_device(name)
    for k, v in accelerator_env(device.type).items():
        os.environ.setdefault(k, v)  # a plain `osp train`; torchrun launches get it from launch.py
    quiet_device_warnings(device.type)
    megatron_cpu.apply()
    return device


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_sample_parallel(device_name: str, sp: bool, heads: int, timeout_s: float = 300.0):
    """For `osp sample` under torchrun (WORLD_SIZE > 1): process group + megatron parallel state with
    TP = world, then (layout, transform) where transform(dit) applies the training TP(/SP) plan."""
    world = world_size_from_env()
    check_sample_layout(world, sp, heads)
    device = setup_device(device_name)
    init_distributed(device, timeout_s)
    layout = init_parallel(world, sp, heads, None, timeout_s)

    def transform(model):
        return parallelize(model, layout)

    return layout, transform
