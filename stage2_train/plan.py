"""How a training run applies its plans to the DiT (after torchtitan's apply_ac / apply_compile):

    parallelize(model, layout)                the TP/SP plan          (osp.stage2_train.parallel)
    apply_context_parallel(model, layout)     the Ulysses CP plan     (osp.stage2_train.context_parallel)
    apply_ac(model, mode)                     activation checkpointing per block (model.checkpointing)
    apply_compile(model)                      torch.compile per block (model.compile)

The model keeps the math and its hooks; these plans replace hooks and per-block forwards in place,
so parameter names, shapes and the state dict stay those of the released checkpoint.

Activation checkpointing modes:
* none: autograd keeps what each op saves;
* selective: the outputs of GEMMs and attention kernels are kept, the elementwise rest is recomputed
  in backward (torch's selective checkpoint contexts);
* full: each block keeps only its inputs and is recomputed in backward.
AC sits inside the block's forward, so compile (applied after it) traces the recompute policy too.
"""

from __future__ import annotations

import types
from typing import cast

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from osp.common.models.dit import DiTBlock, OpenSoraT2V
from osp.common.config import CHECKPOINTING

_aten = torch.ops.aten
# selective recompute keeps the outputs of these (GEMMs and attention kernels); the rest is recomputed
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_attention_math.default,
}
_SAVE_NAMES = ("flash_attn", "npu_fusion_attention")  # attention kernels outside aten (FlashAttention-3, Ascend)


def _selective_policy(ctx, func, *args, **kwargs):
    if func in _SAVE_OPS or any(n in str(func) for n in _SAVE_NAMES):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _full_forward(block: nn.Module, *args):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args)
    return checkpoint(forward, block, *args, use_reentrant=False)


def _selective_forward(block: nn.Module, *args):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args)
    return checkpoint(forward, block, *args, use_reentrant=False, context_fn=_selective_context)


_FORWARDS = {"full": _full_forward, "selective": _selective_forward}


def apply_ac(model: OpenSoraT2V, mode: str) -> None:
    """Activation checkpointing `mode` (none | selective | full) for every transformer block, in place;
    applying another mode replaces the previous one."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"model.checkpointing = {mode!r} is unknown; choose one of {', '.join(CHECKPOINTING)}")
    for module in model.transformer_blocks:
        block = cast(DiTBlock, module)
        block.__dict__.pop("forward", None)  # back to the block's own forward
        if mode != "none":
            block.forward = types.MethodType(_FORWARDS[mode], block)


def apply_compile(model: OpenSoraT2V, **kwargs) -> None:
    """torch.compile each transformer block in place (parameter names unchanged); after apply_ac."""
    for block in model.transformer_blocks:
        block.compile(**kwargs)
