"""Optimisation pieces of the trainer: the global grad norm across TP shards, clipping, the LR
schedule and the DP-sharded EMA. The data-parallel reduction and the (sharded) AdamW come from the
library: `data_parallel.py` (torch DDP + ZeroRedundancyOptimizer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from osp.common.errors import ConfigError
from osp.stage2_train.layout import Layout


def global_grad_norm(params: list[nn.Parameter], sharded: list[bool], layout: Layout) -> torch.Tensor:
    """L2 norm of all gradients of the (TP-sharded) model: TP-sharded params (`sharded[i]`, from the key
    rule table `osp.stage2_train.state_dict_adapter.tp_split_dim`) summed over TP, replicated params counted once (on TP
    rank 0). Identical on every rank. fp32 scalar tensor."""
    device = params[0].device
    tp_size, tp_rank = layout.tp, layout.tp_rank
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p, is_sharded in zip(params, sharded):
        if p.grad is None:
            continue
        if tp_size == 1 or is_sharded or tp_rank == 0:
            sq += p.grad.detach().float().pow(2).sum()
    if tp_size > 1:
        dist.all_reduce(sq, group=layout.tp_group)
    return sq.sqrt()


def clip_grads(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s rule with a precomputed global norm."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))


def lr_at(step: int, base: float, warmup: int, schedule: str, total: int, min_lr: float = 0.0) -> float:
    """LR of optimizer step `step` (0-based): linear warmup over `warmup` steps, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * progress))
    return base


def dp_owners(sizes: list[int], dp_size: int) -> list[int]:
    """Owner DP rank of each tensor: greedy by size in list order, a pure function of the sizes, so
    every rank computes the same split (the sharded EMA uses it)."""
    load, owner = [0] * dp_size, []
    for n in sizes:
        o = min(range(dp_size), key=lambda r: (load[r], r))
        owner.append(o)
        load[o] += n
    return owner


class EMA:
    """EMA of the (local, TP-sharded) trainable parameters with diffusers EMAModel's rule (`update_after_step` =
    `start_step`, upstream's `ema_start_step`): at the k-th update, with j = k - start_step - 1,
    decay = 0 for j <= 0 (the shadow copies the weights), then min(max_decay, (1 + j) / (10 + j)).
    start_step = 0 gives a copy at k = 1, then min(max_decay, k / (k + 9)). The shadow is fp32; one update
    is a single `torch._foreach_lerp_` over all tensors (s += (1 - decay) (p - s)), not a Python loop of kernels.

    Sharded over data parallelism (dp_size > 1): DP rank r keeps and updates only the tensors it owns
    (`dp_owners`), 1/dp of the fp32 EMA per rank; `gathered()` collects the full EMA on DP rank 0 for a
    checkpoint and `load` keeps the owned part of a full one, so checkpoints do not depend on dp."""

    def __init__(self, model: nn.Module, max_decay: float, layout: Layout | None = None, start_step: int = 0):
        layout = layout or Layout()
        dp_group, dp_rank, dp_size = layout.dp_group, layout.dp_rank, layout.dp
        self.max_decay = max_decay
        self.start_step = start_step
        self.updates = 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen (LoRA base): no EMA
        self.all_names = [n for n, _ in named]
        self.owner = dict(zip(self.all_names, dp_owners([p.numel() for _, p in named], dp_size)))
        self.group, self.dp_rank, self.dp_size = dp_group, dp_rank, dp_size
        self.shadow = {n: p.detach().clone().float() for n, p in named if self.owner[n] == dp_rank}
        self._names = list(self.shadow)
        self._shadow_list = [self.shadow[n] for n in self._names]

    def decay(self) -> float:
        step = self.updates - self.start_step - 1
        return 0.0 if step <= 0 else min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        if not self._names:
            return
        params = dict(model.named_parameters())
        current = [params[n].detach() for n in self._names]
        current = [p if p.dtype == torch.float32 else p.float() for p in current]  # bf16 params: an fp32 copy
        # the foreach ops are torch's public fused list ops, only missing from torch.__all__
        weight = 1.0 - self.decay()
        torch._foreach_lerp_(self._shadow_list, current, weight)  # pyright: ignore[reportPrivateImportUsage]

    @torch.no_grad()
    def gathered(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full EMA (every local tensor) on DP rank 0, None elsewhere. Collective over the DP group
        (point-to-point from each owner; one tensor in flight at a time)."""
        if self.dp_size == 1:
            return self.shadow
        group = self.group
        assert group is not None, "a DP-sharded EMA (dp_size > 1) needs its DP group"
        params = dict(model.named_parameters())
        first = dist.get_global_rank(group, 0)
        out: dict[str, torch.Tensor] = {}
        for n in self.all_names:
            o = self.owner[n]
            if o == 0:
                if self.dp_rank == 0:
                    out[n] = self.shadow[n]
            elif self.dp_rank == o:
                dist.send(self.shadow[n], dst=first, group=self.group)
            elif self.dp_rank == 0:
                buf = torch.empty(params[n].shape, dtype=torch.float32, device=params[n].device)
                dist.recv(buf, src=dist.get_global_rank(group, o), group=group)
                out[n] = buf.cpu()
        return out if self.dp_rank == 0 else None

    def load(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        """Load a full EMA (every local tensor); this rank keeps what it owns."""
        if set(shadow) != set(self.all_names):
            raise ConfigError("EMA weights in the checkpoint do not match the model's parameters")
        for n in self._names:
            self.shadow[n].copy_(shadow[n])
        self.updates = int(updates)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the model holds the EMA weights (every local tensor: each owner broadcasts
        its part over DP); afterwards its own weights again, bit for bit (restored from a copy on the
        device). Collective over the DP group. Nothing of the EMA, the optimizer or the grads changes."""
        params = dict(model.named_parameters())
        backup = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n in self.all_names:
                    p = params[n]
                    if self.owner[n] == self.dp_rank:
                        p.copy_(self.shadow[n])
                    if self.dp_size > 1:
                        assert self.group is not None
                        src = dist.get_global_rank(self.group, self.owner[n])
                        dist.broadcast(p.data, src=src, group=self.group)
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
