"""Ulysses context parallelism (CP) for OpenSoraT2V: a second plan, applied after the TP/SP plan.

Layout per CP rank (C = CP size, r = CP rank, N = TP size, S video tokens, h heads, megatron's
rank order tp-cp-dp: a CP group holds the ranks of one TP rank across C consecutive TP groups):

* `scatter_video`: the [S, B, D] tokens after the patch embedding are split over CP first (rank r
  keeps tokens [r S/C, (r+1) S/C), contiguous in the t-major order), then the TP plan's SP split of
  that chunk over TP (S % (C N) == 0 under SP, S % C == 0 otherwise). Backward: all-gather, so the
  patch embedding's grads are complete on every CP rank.
* `scatter_rope`: the full-grid RoPE angle table is sliced to the rank's positions (q/k hold only
  the CP chunk; under SP the column linears gather the chunk over TP, never over CP).
* self-attention (`attn1.core`, the kernel call on [B, h/N, S/C, hd] after RoPE): one all-to-all over
  CP scatters heads and gathers the sequence -> [B, h/(N C), S, hd], the kernel runs over the full
  sequence, a second all-to-all goes back -> [B, h/N, S/C, hd]. q, k and v travel in one collective.
  Needs h % (N C) == 0. The video mask bias [B, 1, 1, S] is over keys, which are full-length there.
* cross-attention: no communication; each rank's query shard attends to the full replicated text.
* `scatter_text`, `t6_hook`: identity forward, all-reduce over CP backward (megatron's copy_to), so
  the caption projection and adaln_single grads are complete on every CP rank.
* `gather_video`: the SP gather over TP, then an all-gather over CP (backward: the rank's slice);
  the final layer runs on the full sequence, identically on every CP rank (complete grads).

Gradients: parameters are replicated over CP. Block parameters (`transformer_blocks.*`) see only
the rank's tokens, so their grads are partial sums over CP; every other parameter's grad is complete
on each CP rank. `scale_replicated_grads` divides the complete ones by C, after which ONE sum over the
data x context parallel group (megatron's `with_context_parallel=True` group) divided by the DP size
gives the exact averaged gradient for every parameter. Forgetting it is a gradient-only bug (outputs
stay right), which tests/test_cp.py checks with a negative control.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from osp.common.models.rope import RopeTable
from osp.stage2_train.layout import Layout, LayoutError, check_context_parallel
from osp.stage2_train.parallel import plan_layout

if TYPE_CHECKING:
    from osp.common.models.dit import DiTBlock, OpenSoraT2V

BLOCK_PREFIX = "transformer_blocks."  # parameters that see only the CP rank's tokens


def _tensor_parallel():
    """megatron's tensor_parallel mappings, imported once the CPU shim is in place."""
    from osp.common import megatron_cpu

    megatron_cpu.apply()  # no-op with an accelerator
    from megatron.core import tensor_parallel

    return tensor_parallel


def ulysses_to_heads(qkv: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[n, B, h, S/C, hd] (sequence shard, all local heads) -> [n, B, h/C, S, hd] (head shard, full sequence)."""
    tp = _tensor_parallel()
    n, b, h, sl, hd = qkv.shape
    x = qkv.reshape(n, b, cp, h // cp, sl, hd).permute(2, 0, 1, 3, 4, 5)  # chunk j (head group j) -> CP rank j
    x = tp.all_to_all(group, x.contiguous())  # chunk j now holds CP rank j's tokens of our head group
    return x.permute(1, 2, 3, 0, 4, 5).reshape(n, b, h // cp, cp * sl, hd)


def ulysses_to_sequence(o: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The inverse: [B, h/C, S, hd] -> [B, h, S/C, hd]."""
    tp = _tensor_parallel()
    b, hc, s, hd = o.shape
    x = o.reshape(b, hc, cp, s // cp, hd).permute(2, 0, 1, 3, 4)  # chunk j (tokens of CP rank j) -> rank j
    x = tp.all_to_all(group, x.contiguous())  # chunk j now holds head group j of our tokens
    return x.permute(1, 0, 2, 3, 4).reshape(b, cp * hc, s // cp, hd)


class UlyssesAttention:
    """Replaces `Attention.core` of a self-attention: all-to-all, the original kernel, all-to-all back.

    `skip_inverse` exists only for the negative control of tests/test_cp.py: it replaces the second
    all-to-all by a local re-layout of the same shape (the rank's own tokens, its own heads repeated)."""

    def __init__(self, kernel, group, cp: int, rank: int, skip_inverse: bool = False):
        self.kernel, self.group, self.cp, self.rank, self.skip_inverse = kernel, group, cp, rank, skip_inverse

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h = q.shape[1]
        if h % self.cp:
            raise LayoutError(
                f"context parallelism splits the {h} attention heads of a rank over parallel.cp={self.cp}; "
                "choose parallel.tp x parallel.cp dividing the DiT's heads"
            )
        q, k, v = ulysses_to_heads(torch.stack([q, k, v]), self.group, self.cp).unbind(0)
        o = self.kernel(q, k, v, bias)  # [B, h/C, S, hd]
        if self.skip_inverse:
            sl = o.shape[2] // self.cp
            return o[:, :, self.rank * sl : (self.rank + 1) * sl].repeat(1, self.cp, 1, 1)
        return ulysses_to_sequence(o, self.group, self.cp)


def apply_context_parallel(model: OpenSoraT2V, layout: Layout, skip_inverse: bool = False) -> OpenSoraT2V:
    """Apply the Ulysses CP plan of `layout` (its CP size, rank and group) in place, after
    `parallel.parallelize(model, layout)`. CP size 1 leaves the model unchanged."""
    if getattr(model, "_osp_cp", False):
        raise RuntimeError("context parallelism is already applied to this model")
    if getattr(model, "_osp_layout", layout) is not layout:
        raise RuntimeError("apply_context_parallel needs the layout the TP/SP plan was applied with")
    model._osp_layout, model._osp_cp = layout, True
    cp, rank, group, tp, sp = layout.cp, layout.cp_rank, layout.cp_group, layout.tp, layout.sp
    if cp == 1:
        return model
    tensor_parallel = _tensor_parallel()
    check_context_parallel(model.config.num_attention_heads, None, tp, cp, sp)
    inner_scatter, inner_gather = model.scatter_video, model.gather_video
    inner_t6, inner_text = model.t6_hook, model.scatter_text

    def scatter_video(x: torch.Tensor) -> torch.Tensor:
        check_context_parallel(model.config.num_attention_heads, x.shape[0], tp, cp, sp)
        return inner_scatter(tensor_parallel.scatter_to_sequence_parallel_region(x, group=group))

    def gather_video(x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.gather_from_sequence_parallel_region(
            inner_gather(x), tensor_parallel_output_grad=False, group=group
        )

    def t6_hook(x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.copy_to_tensor_model_parallel_region(inner_t6(x), group=group)

    def scatter_text(x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.copy_to_tensor_model_parallel_region(inner_text(x), group=group)

    def scatter_rope(table: RopeTable) -> RopeTable:
        n = table.angles.shape[0] // cp
        return RopeTable(table.angles[rank * n : (rank + 1) * n])

    model.scatter_video, model.gather_video, model.t6_hook = scatter_video, gather_video, t6_hook
    model.scatter_text, model.scatter_rope = scatter_text, scatter_rope
    for block in model.transformer_blocks:
        attn = cast("DiTBlock", block).attn1
        attn.core = UlyssesAttention(attn.core, group, cp, rank, skip_inverse)
    return model


def context_parallel_size(model: nn.Module) -> int:
    return plan_layout(model).cp if getattr(model, "_osp_cp", False) else 1


@torch.no_grad()
def scale_replicated_grads(model: nn.Module) -> None:
    """Before the gradient sum over the data x context parallel group: divide by CP the grads that
    are already complete on every CP rank (all but the block parameters). No-op without CP."""
    cp = context_parallel_size(model)
    if cp == 1:
        return
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith(BLOCK_PREFIX) and p.grad is not None]
    if grads:
        # the foreach ops are torch's public fused list ops, only missing from torch.__all__
        torch._foreach_div_(grads, float(cp))  # pyright: ignore[reportPrivateImportUsage]
