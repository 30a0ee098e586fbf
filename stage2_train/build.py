"""Model construction per rank: build on meta -> TP/SP plan -> materialise only the local shard -> fill.

    model = build_local(dit_cfg, layout)             # nothing allocated (a dry run stops here)
    materialize(model, device)                       # to_empty: this rank's shard, uninitialised
    fill_from_folder(model, init_dir, tp, rank)      # released / osp-dit safetensors, by slices
    fill_random(model, dit_cfg, seed, layout)        # or the seeded init of a new run
    (or osp.stage2_train.checkpoint.load: a training checkpoint, resharded by DCP)

No rank ever holds the full model when it starts from a checkpoint or released weights; only a run
from random weights builds the full model once (its init must not depend on the TP size).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from osp.common.convert import SliceReader, check_keys, shard_tensor, tensor_shapes
from osp.common.models.dit import OpenSoraT2V, build_dit
from osp.stage2_train.context_parallel import apply_context_parallel
from osp.stage2_train.layout import Layout
from osp.stage2_train.parallel import parallelize


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
def fill_from_folder(
    model: nn.Module, folder: str | Path, tp: int, rank: int, prefer_ema: bool = True, progress: bool = False
) -> None:
    """Copy this rank's slices of a released diffusers folder or an osp-dit checkpoint (any saved TP
    size) into the materialised model. Strict: keys and full shapes are checked first."""
    reader = SliceReader(folder, prefer_ema)
    full = tensor_shapes(build_dit(reader.config, device="meta"))
    on_disk = {k: torch.empty(reader.shape(k), device="meta") for k in reader.keys()}
    check_keys(full, on_disk, str(folder))
    items = list(_params(model).items())
    if progress:
        from rich.progress import track

        items = track(items, description=f"load {Path(folder).name}")
    for k, dst in items:
        dst.copy_(reader.read(k, tp, rank))


@torch.no_grad()
def fill_random(model: nn.Module, dit_cfg, seed: int, layout: Layout) -> None:
    """The seeded random init of a new run, equal at every TP size: the full model is built once on
    CPU from `seed` and each rank copies its shard."""
    torch.manual_seed(seed)
    full = build_dit(dit_cfg, dtype=torch.float32).state_dict()
    for k, dst in _params(model).items():
        dst.copy_(shard_tensor(k, full[k], layout.tp, layout.tp_rank))
