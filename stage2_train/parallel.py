"""The megatron-core tensor + sequence parallel plan for OpenSoraT2V (applied in place).

Layout per TP rank (N = TP size, S video tokens, L text tokens, D width, h heads):

* column-parallel (ColumnParallelLinear, gather_output=False): attn1/attn2 to_q, to_k, to_v and
  ff.net.0.proj -> each rank holds heads [r*h/N, (r+1)*h/N) / FFN columns; the attention module reads
  the local head count from the projection width, so the model code is unchanged;
* fused q/k/v: the model concatenates the LOCAL q/k/v shards (head-aligned: rank r's rows of each)
  per call and runs them through `fused_forward` = megatron's
  `linear_with_grad_accumulation_and_async_allreduce`: ONE sequence-parallel all-gather of the block
  input, one GEMM, only the local shard saved for backward (re-gathered there, overlapped with the
  dgrad GEMM). Parameters, names and per-rank shards are exactly those of three separate linears;
* precision: every linear casts its (fp32 master) weight and bias to the input's dtype, so GEMM
  outputs, bias adds and the collectives run in the activation dtype (bf16 in a bf16 run);
* row-parallel (RowParallelLinear, input_is_parallel=True): attn1/attn2 to_out.0 and ff.net.2, full
  bias added after the reduce;
* replicated: pos_embed, adaln_single, caption_projection, block and final scale_shift_table,
  proj_out (the final layer runs after the gather, identically on every rank).

Sequence parallelism (megatron's SP: every mapping acts on dim 0, hence the sequence-first blocks):
* `scatter_video` splits the [S, B, D] tokens into S/N shards (S % N == 0 required); the column
  linears all-gather them (q/k/v hold the full sequence and the local heads, so attention and the
  full-sequence RoPE table need nothing special) and the row linears reduce-scatter back;
* text stays REPLICATED (no scatter, no L % N constraint): the cross-attention to_k/to_v are built
  from a second config with sequence_parallel=False (identity forward, all-reduce backward);
* `t6_hook` = copy_to_tensor_model_parallel_region: t6 feeds every shard, so its gradient is summed
  over TP once at the activation (fixes all of adaln_single, whatever else uses embedded_t);
* each block's scale_shift_table is tagged `sequence_parallel` (row biases are tagged by megatron):
  `reduce_sequence_parallel_grads(model)` SUMs exactly those grads over the TP group after backward;
* `gather_video` = gather_from_sequence_parallel_region(tensor_parallel_output_grad=False): the
  backward is a plain split, correct because everything after it is replicated.
Never tag adaln_single (t6_hook already sums its gradient) or the final table (it acts after the gather,
so every rank already holds its full gradient): either would be counted TP times.

Works on CUDA (nccl), NPU (hccl) and CPU (gloo, with `osp.common.megatron_cpu.apply()`).
"""

from __future__ import annotations

from functools import lru_cache

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from osp.stage2_train.state_dict_adapter import check_keys, check_tp, shard_tensor, tensor_shapes
from osp.common.models.dit import DiTBlock, GELUProj, OpenSoraT2V, gelu_linear
from osp.stage2_train.layout import Layout


def _megatron():
    from osp.common import megatron_cpu

    megatron_cpu.apply()  # no-op with an accelerator
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    return ModelParallelConfig, parallel_state, tensor_parallel


class _NoExtraState:
    """Drops megatron's empty `_extra_state` entry, so that a parallelized model's state_dict has
    exactly the released key names (TP shards of them): EMA, checkpoints and strict loads see one
    key set at every TP size."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()  # pyright: ignore[reportAttributeAccessIssue] (megatron's hook only inserts `_extra_state`)


def _noop_init(weight: torch.Tensor) -> None:  # weights are copied from the replicated module
    return None


@lru_cache(maxsize=None)
def _column_cls() -> Any:
    _, _, tp = _megatron()

    class ColumnLinear(_NoExtraState, tp.ColumnParallelLinear):
        """ColumnParallelLinear computing in the input's dtype, returning only the output (parameter
        names stay weight / bias). `fused_forward` also serves concatenated q/k/v weights."""

        def fused_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            sp = self.sequence_parallel
            return tp.linear_with_grad_accumulation_and_async_allreduce(
                x,
                w,
                b,
                gradient_accumulation_fusion=False,
                allreduce_dgrad=not sp,
                sequence_parallel=sp,
                tp_group=self.tp_group,
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            dt = x.dtype
            return self.fused_forward(x, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))

    return ColumnLinear


@lru_cache(maxsize=None)
def _row_cls() -> Any:
    _, _, tp = _megatron()

    class RowLinear(_NoExtraState, tp.RowParallelLinear):
        """RowParallelLinear (input_is_parallel) returning only the output, bias added after the reduce."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return self._reduce(torch.nn.functional.linear(x, self.weight.to(x.dtype)))  # partial sums

        def forward_gelu_input(self, pre: torch.Tensor) -> torch.Tensor:
            """ff.net.2 on the GELU pre-activation (GELU recomputed in backward, see dit.gelu_linear)."""
            return self._reduce(gelu_linear(pre, self.weight.to(pre.dtype)))

        def _reduce(self, out: torch.Tensor) -> torch.Tensor:
            dt = out.dtype
            if self.sequence_parallel:
                out = tp.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = tp.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
            return out + self.bias.to(dt)

    return RowLinear


def _make_config(tp: int, sp: bool, dtype: torch.dtype):
    ModelParallelConfig, _, _ = _megatron()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def _swap(parent: nn.Module, name: str, new: Any, old: nn.Linear, key_w: str, key_b: str, tp: int, rank: int) -> None:
    if not old.weight.is_meta:  # a model built on meta gets its shards later (osp.stage2_train.build)
        with torch.no_grad():
            new.weight.copy_(shard_tensor(key_w, old.weight, tp, rank))
            if old.bias is not None:
                new.bias.copy_(shard_tensor(key_b, old.bias, tp, rank))
    new._drop_extra_state_hook()
    new.to(old.weight.device)
    if isinstance(parent, nn.ModuleList):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def parallelize(model: Any, layout: Layout) -> Any:
    """Apply the TP(/SP) plan of `layout` (its TP size, rank, group and SP switch) in place to an
    OpenSoraT2V holding the FULL weights (identical on every TP rank). TP size 1 leaves the model
    unchanged. A model on the meta device stays there (the new layers too): nothing is allocated or
    copied. The model records the layout (`model._osp_layout`) for the steps after backward."""
    if getattr(model, "_osp_layout", None) is not None:
        raise RuntimeError("model is already parallelized")
    if model.proj_out.weight.is_meta:
        with torch.device("meta"):
            return _parallelize(model, layout)
    return _parallelize(model, layout)


def _parallelize(model: OpenSoraT2V, layout: Layout) -> OpenSoraT2V:
    tp, rank, group, sequence_parallel = layout.tp, layout.tp_rank, layout.tp_group, layout.sp
    cfg = model.config
    model._osp_layout = layout
    if tp == 1:
        return model
    check_tp(cfg, tp)
    _, _, tensor_parallel = _megatron()
    Column, Row = _column_cls(), _row_cls()
    dtype = model.proj_out.weight.dtype
    seq_cfg = _make_config(tp, sequence_parallel, dtype)
    rep_cfg = _make_config(tp, False, dtype) if sequence_parallel else seq_cfg  # for the replicated text

    def column(lin: nn.Linear, c) -> nn.Module:
        return Column(
            lin.in_features,
            lin.out_features,
            config=c,
            init_method=_noop_init,
            bias=lin.bias is not None,
            gather_output=False,
            skip_bias_add=False,
            tp_group=group,
        )

    def row(lin: nn.Linear) -> nn.Module:
        return Row(
            lin.in_features,
            lin.out_features,
            config=seq_cfg,
            init_method=_noop_init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )

    for i, module in enumerate(model.transformer_blocks):
        block = cast(DiTBlock, module)
        pre = f"transformer_blocks.{i}"
        for an in ("attn1", "attn2"):
            attn = getattr(block, an)
            for ln in ("to_q", "to_k", "to_v"):
                c = rep_cfg if (an == "attn2" and ln != "to_q") else seq_cfg
                old = getattr(attn, ln)
                _swap(attn, ln, column(old, c), old, f"{pre}.{an}.{ln}.weight", f"{pre}.{an}.{ln}.bias", tp, rank)
            old = attn.to_out[0]
            _swap(attn.to_out, "0", row(old), old, f"{pre}.{an}.to_out.0.weight", f"{pre}.{an}.to_out.0.bias", tp, rank)
        old = cast(GELUProj, block.ff.net[0]).proj
        _swap(
            block.ff.net[0],
            "proj",
            column(old, seq_cfg),
            old,
            f"{pre}.ff.net.0.proj.weight",
            f"{pre}.ff.net.0.proj.bias",
            tp,
            rank,
        )
        old = cast(nn.Linear, block.ff.net[2])
        _swap(block.ff.net, "2", row(old), old, f"{pre}.ff.net.2.weight", f"{pre}.ff.net.2.bias", tp, rank)

    if sequence_parallel:

        def scatter_video(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % tp:
                raise ValueError(
                    f"sequence parallelism needs the video token count T*H/2*W/2 = {x.shape[0]} to be a multiple of TP={tp}; "
                    "change the clip size or run with sequence_parallel off"
                )
            return tensor_parallel.scatter_to_sequence_parallel_region(x, group=group)

        def gather_video(x: torch.Tensor) -> torch.Tensor:
            return tensor_parallel.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=group
            )

        def t6_hook(x: torch.Tensor) -> torch.Tensor:
            return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)

        model.scatter_video, model.gather_video, model.t6_hook = scatter_video, gather_video, t6_hook
        for block in model.transformer_blocks:
            table = cast(DiTBlock, block).scale_shift_table
            table.sequence_parallel = True  # pyright: ignore[reportAttributeAccessIssue] (megatron's parameter flag)
    return model


def reduce_sequence_parallel_grads(model: nn.Module) -> None:
    """After backward: SUM over the TP group the grads of parameters tagged `sequence_parallel`
    (block scale_shift_tables, row-parallel biases). No-op without SP. One coalesced all-reduce."""
    layout = plan_layout(model)
    if not layout.sp or layout.tp == 1:
        return
    group = layout.tp_group
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


# ------------------------------------------------------------------------------------------------
# full state dicts into a parallelized model (checkpointing)
# ------------------------------------------------------------------------------------------------
def plan_layout(model: nn.Module) -> Layout:
    """The Layout whose plan was applied to `model` (a single-process Layout for a plain model)."""
    return getattr(model, "_osp_layout", None) or Layout()


def local_state_dict(full: dict[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    return {k: shard_tensor(k, v, tp, rank) for k, v in full.items()}


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load a TP=1 state dict into a (possibly parallelized) model: each rank takes its shard.
    Strict: missing / unexpected keys and shape mismatches are listed in one error."""
    layout = plan_layout(model)
    local = local_state_dict(full, layout.tp, layout.tp_rank)
    check_keys(tensor_shapes(model), local, source)
    model.load_state_dict(local, strict=True)
