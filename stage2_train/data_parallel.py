"""Data parallelism from the library: torch DDP (bucketed gradient all-reduce overlapped with backward,
gradients as views of the contiguous bucket buffers) + torch `ZeroRedundancyOptimizer` (AdamW state
sharded over the data-parallel ranks). The same path runs on gloo (CPU), NCCL and HCCL.

Parameters are replicated over DP x CP (`Layout.dp_cp_group`), so both reduce and shard over that group.
The bucket hook sums over DP x CP and divides by the DP size (not the group size): CP-partial block
grads then hold their complete value, and the CP-complete rest is divided by CP afterwards by
`context_parallel.scale_replicated_grads` (all of it linear, so the order does not change the sum).
SP-tagged grads are summed over TP afterwards (`parallel.reduce_sequence_parallel_grads`).

    dp = DataParallel(model, layout, overlap=True, bucket_mb=25)   # over layout.dp_cp_group
    for micro in range(accum):
        with dp.sync(micro == accum - 1):        # no DP reduction on the non-final micro-steps
            dp.module(...).backward()
    opt = ShardedAdamW(params, names, layout.dp_cp_group, shard=True, keep_grads=dp.ddp is not None, lr=...)

Why not megatron-core's DDP + DistributedOptimizer on accelerators: the optimizer does not build on
CPU (hard-coded `device="cuda"`), so CI could not test the path the cluster runs; it shards a flat
buffer across ranks mid-tensor, while checkpoints keep AdamW moments as whole tensors under the
released parameter names (a rank owns whole parameters here); and its DDP puts grads in `main_grad`,
outside the TP-aware norm/clip and SP/CP reductions this trainer applies to `.grad`. torch DDP gives
the same bucketed, overlapped reduction with grads in contiguous buffers. FSDP2 (ZeRO-3) would
re-shard the parameters around every block on top of megatron's TP layers; ZeRO-1 already fits the
2.77 B model (bench/scaleout.py state column).

`ShardedAdamW.optim` is the torch AdamW over the parameters this rank owns, its `.state[p]` holding
exp_avg / exp_avg_sq / step: the checkpoint code reads and fills the owned moments through it
(`owned_state` / `load_owned_state` by parameter name).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from osp.stage2_train.layout import Layout

ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class _HookState:
    group: object
    divisor: float
    overlap: bool
    buckets: int = 0  # buckets reduced since construction (tests, bench)


def _reduce_bucket(state, bucket):  # no annotations: DDP checks them and they are strings under `annotations`
    """DDP comm hook: SUM one bucket over the group (gloo has no AVG), divided by the DP size.
    overlap=False waits for the all-reduce inside the hook, so backward stalls on every bucket (the
    blocking reference of bench/dp_overlap.py; the numbers are the same)."""
    state.buckets += 1
    buf = bucket.buffer()
    if state.divisor != 1.0:
        buf.div_(state.divisor)
    work = dist.all_reduce(buf, group=state.group, async_op=True)
    assert work is not None  # async_op=True returns the Work handle
    if not state.overlap:
        work.wait()
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut
    # in place: the bucket itself is the result (also under the dry run's fake group, whose futures carry no value)
    return work.get_future().then(lambda f: buf)


class DataParallel:
    """DDP over the layout's DP x CP group (None or a size-1 group: the bare module, nothing to reduce),
    each bucket summed there and divided by the DP size.

    `module` is what the forward runs through; `sync(final)` is the context of one micro-step's
    forward + backward (reduction only on the final one)."""

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        *,
        overlap: bool = True,
        bucket_mb: float = 25.0,
        device_ids: list[int] | None = None,
    ):
        self.model = model
        group = layout.dp_cp_group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.hook = _HookState(group, float(layout.dp), overlap)
        if self.size == 1:  # nothing to reduce
            self.ddp = None
            self.module = model
            return
        self.ddp = DistributedDataParallel(
            model,
            device_ids=device_ids,
            process_group=group,
            bucket_cap_mb=bucket_mb,
            # the DiT registers no buffers, so DDP's default buffer sync has nothing to send (and the
            # broadcast_buffers switch is deprecated in current torch)
            gradient_as_bucket_view=True,  # .grad are views of the flat bucket buffers: no copies
        )
        self.ddp.register_comm_hook(self.hook, _reduce_bucket)
        self.module = self.ddp

    def sync(self, final: bool):
        """Context of one micro-step: no DP reduction unless `final` (grads accumulate locally)."""
        if self.ddp is None or final:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


class ShardedAdamW:
    """AdamW over `params`; with `shard` and a group of size > 1, torch's ZeroRedundancyOptimizer: each
    rank of `group` owns a subset of the parameters (its partition, greedy by size), keeps AdamW state
    for them only, updates them and broadcasts them to the other ranks after the step."""

    def __init__(
        self, params: list[nn.Parameter], names: list[str], group, *, shard: bool, keep_grads: bool = False, **adamw
    ):
        self.params, self.names, self.keep_grads = params, names, keep_grads
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.sharded = bool(shard) and self.size > 1
        if self.sharded:
            self.zero = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=group, **adamw)
            self.optim = self.zero.optim  # the local AdamW over this rank's partition
            self._groups = self.zero.param_groups  # ZeRO copies these into the local optimizer at each step
        else:
            self.zero = None
            self.optim = torch.optim.AdamW(params, **adamw)
            self._groups = None
        self._name_of = {id(p): n for p, n in zip(params, names)}

    def set_lr(self, lr: float) -> None:
        # re-read every time: load_state_dict replaces the local optimizer's param_groups
        for g in self._groups if self._groups is not None else self.optim.param_groups:  # set iff sharded
            g["lr"] = lr

    def zero_grad(self) -> None:
        """keep_grads (under DDP, whose buckets hold the grads as views): zero them in place; otherwise
        free them until the next backward."""
        for p in self.params:
            if not self.keep_grads:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        (self.zero or self.optim).step()

    # -- per-parameter state (checkpoints) -------------------------------------------------
    def owned(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter whose AdamW state lives on this rank."""
        return [(self._name_of[id(p)], p) for g in self.optim.param_groups for p in g["params"]]

    def owned_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {exp_avg, exp_avg_sq, step}} of the owned parameters that have state (the live tensors)."""
        out = {}
        for n, p in self.owned():
            st = self.optim.state.get(p)
            if st and "exp_avg" in st:
                out[n] = {k: st[k] for k in ADAM_STATE}
        return out

    def load_owned_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Install {name: {exp_avg, exp_avg_sq, step}} for owned parameters (others in `state` are ignored)."""
        for n, p in self.owned():
            if n in state:
                st = state[n]
                self.optim.state[p] = {
                    "exp_avg": st["exp_avg"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": st["exp_avg_sq"].to(p.device, p.dtype).clone(),
                    "step": torch.as_tensor(st["step"], dtype=torch.float32).clone(),
                }

    # -- whole state (today's per-rank checkpoint files) ------------------------------------
    def state_dict(self) -> dict:
        return {"zero1": self.sharded, "dp_size": self.size, "dp_rank": self.rank, "optim": self.optim.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if bool(sd.get("zero1")) != self.sharded or (
            self.sharded and (sd.get("dp_size"), sd.get("dp_rank")) != (self.size, self.rank)
        ):
            raise ValueError(
                "optimizer state was saved with another parallel.zero1 / data-parallel layout; "
                "resume with the same parallel.zero1 and data-parallel size"
            )
        self.optim.load_state_dict(sd["optim"])
