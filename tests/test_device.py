"""Device layer and the megatron-core CPU shim.

The shim test exercises every patched entry point through a real megatron-core call in a
2-process gloo group: the RNG tracker (seed + fork), the all-gather / reduce-scatter buffers
(current_device) inside the sequence-parallel mappings and a ColumnParallelLinear with SP, and
dist_checkpointing save/load (synchronize).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from osp.common import device as devmod
from osp.common.device import Device, pick_device


def test_pick_device_cpu_and_backends():
    d = pick_device("auto")
    assert d.type == "cpu" and d.backend == "gloo" and d.autocast_dtype == torch.float32
    assert Device("cuda").backend == "nccl" and Device("npu").backend == "hccl"
    assert Device("cuda").autocast_dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="--device cpu"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")


class _BrokenImport:
    """A meta-path finder whose torch_npu import fails the way a torch_npu install without CANN does."""

    def __init__(self, error: type[BaseException]):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            raise self.error("libhccl.so: cannot open shared object file")
        return None


@pytest.mark.parametrize("error", [ImportError, OSError, RuntimeError])
def test_npu_guard_when_torch_npu_import_fails(monkeypatch, error):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport(error), *sys.meta_path])
    devmod.npu_available.cache_clear()
    try:
        assert devmod.npu_available() is False
        with pytest.raises(RuntimeError, match="torch_npu is not usable"):
            pick_device("npu")
    finally:
        devmod.npu_available.cache_clear()


def test_npu_guard_with_a_working_torch_npu(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    devmod.npu_available.cache_clear()
    try:
        assert devmod.npu_available() is True and pick_device("npu").backend == "hccl"
    finally:
        devmod.npu_available.cache_clear()


def test_shim_not_applied_with_accelerator():
    # In a fresh interpreter: pretend CUDA is present; apply() must leave torch.cuda alone.
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from osp.common import megatron_cpu as m\n"
        "orig = torch.cuda.current_device\n"
        "assert m.apply() is False and not m.is_applied()\n"
        "assert torch.cuda.current_device is orig\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shim_worker(rank: int, world: int, port: int, ckpt_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from osp.common import megatron_cpu

    assert megatron_cpu.apply() is True
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as tp
    from megatron.core.model_parallel_config import ModelParallelConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=world)

    # 1. RNG: model_parallel_cuda_manual_seed (manual_seed, _get/_set_cuda_rng_state) and fork().
    tp.model_parallel_cuda_manual_seed(1234)
    default_draw = torch.randn(4)
    with tp.get_cuda_rng_tracker().fork():
        tp_draw = torch.randn(4)
    draws = [torch.empty(4) for _ in range(world)]
    dist.all_gather(draws, default_draw)
    assert torch.equal(draws[0], draws[1]), "default RNG stream must agree across TP ranks"
    dist.all_gather(draws, tp_draw)
    assert not torch.equal(draws[0], draws[1]), "model-parallel RNG stream must differ per TP rank"

    # 2. SP mappings (current_device inside the all-gather / reduce-scatter buffers).
    x = torch.arange(6.0).reshape(3, 2) + 10 * rank  # this rank's shard [S/TP, D]
    full = tp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
    expect = torch.cat([torch.arange(6.0).reshape(3, 2) + 10 * r for r in range(world)])
    assert torch.equal(full, expect)
    rs = tp.reduce_scatter_to_sequence_parallel_region(torch.ones(2 * world, 3) * (rank + 1))
    assert torch.equal(rs, torch.full((2, 3), float(sum(range(1, world + 1)))))

    # 3. ColumnParallelLinear with sequence parallelism: forward and backward vs a dense reference.
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=world,
        sequence_parallel=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    torch.manual_seed(0)
    w_full, b_full = torch.randn(8, 5), torch.randn(8)
    lin = tp.ColumnParallelLinear(5, 8, config=cfg, init_method=lambda w: None, bias=True, gather_output=False)
    with torch.no_grad():
        lin.weight.copy_(w_full.chunk(world)[rank])
        lin.bias.copy_(b_full.chunk(world)[rank])
    inp_full = torch.randn(6, 1, 5)
    inp = inp_full.chunk(world)[rank].clone().requires_grad_(True)
    out, _ = lin(inp)
    ref = inp_full @ w_full.T + b_full
    torch.testing.assert_close(out, ref.chunk(world, dim=-1)[rank])
    out.sum().backward()
    assert inp.grad is not None and lin.weight.grad is not None

    # 4. dist_checkpointing save/load (synchronize in the save path).
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = {"w": ShardedTensor.from_rank_offsets("w", lin.weight.detach().clone(), (0, rank, world))}
    dist_checkpointing.save(sd, ckpt_dir)
    empty = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros_like(lin.weight), (0, rank, world))}
    loaded = dist_checkpointing.load(empty, ckpt_dir)
    assert torch.equal(loaded["w"], lin.weight.detach())
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_megatron_cpu_shim_two_process(tmp_path):
    (tmp_path / "ckpt").mkdir()
    mp.spawn(_shim_worker, args=(2, _free_port(), str(tmp_path / "ckpt")), nprocs=2, join=True)
