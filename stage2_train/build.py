"""Model construction per rank: build on meta -> TP/SP plan -> materialise only the local shard -> fill.

    model = build_local(dit_cfg, layout)             # nothing allocated (a dry run stops here)
    materialize(model, device)                       # to_empty: this rank's shard, uninitialised
    fill_random(model, dit_cfg, seed, layout)        # the seeded init of a new run
    (or osp.stage2_train.checkpoint: `load_init` for model.init, `load` for a resume)

No rank ever holds the full model when it starts from a checkpoint or released weights; only a run
from random weights builds the full model once (its init must not depend on the TP size).
"""

from __future__ import annotations


import torch
from torch import nn

from osp.common.models.dit import OpenSoraT2V, build_dit
from osp.stage2_train.context_parallel import apply_context_parallel
from osp.stage2_train.layout import Layout
from osp.stage2_train.parallel import parallelize
from osp.stage2_train.state_dict_adapter import shard_tensor


def build_local(dit_cfg, layout: Layout) -> OpenSoraT2V:
    """OpenSoraT2V on the meta device with this rank's TP/SP and CP plans applied (fp32 parameters)."""
    return apply_context_parallel(parallelize(build_dit(dit_cfg, device="meta", dtype=torch.float32), layout), layout)


def materialize(model: nn.Module, device) -> nn.Module:
    """Allocate the (local) parameters on `device`, uninitialised. Keeps the attributes megatron and
    the SP plan put on parameters (`sequence_parallel`, `tensor_model_parallel`, ...)."""
    attrs = {n: dict(vars(p)) for n, p in model.named_parameters()}
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        for k, v in attrs[n].items():
            setattr(p, k, v)
    if any(b.is_meta for b in model.buffers()):
        raise RuntimeError("a buffer is still on meta after to_empty; buffers must be computed in forward")
    return model


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@torch.no_grad()
def fill_random(model: nn.Module, dit_cfg, seed: int, layout: Layout) -> None:
    """The seeded random init of a new run, equal at every TP size: the full model is built once on
    CPU from `seed` and each rank copies its shard."""
    torch.manual_seed(seed)
    full = build_dit(dit_cfg, dtype=torch.float32).state_dict()
    for k, dst in _params(model).items():
        dst.copy_(shard_tensor(k, full[k], layout.tp, layout.tp_rank))
