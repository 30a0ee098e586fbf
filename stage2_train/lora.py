"""LoRA adapters on the DiT's block linears, under every layout of the TP/SP and CP plans.

    apply_lora(model, spec)          after parallelize / apply_context_parallel (meta or real):
                                     adapters added, base frozen (bf16 by default), forwards extended
    init_adapters(model, seed)       A ~ U(+-1/sqrt(in)) (peft's default), B = 0: equal at every TP size
    merge_state_dict(base, adapters, scale)   full TP=1 weights with W + s B A folded in

Each adapted linear `<name>` holds `<name>.lora_A.weight` [r, in] and `<name>.lora_B.weight` [out, r]
(peft's key names); its output becomes  base(x) + s * B(A(dropout(x))),  s = alpha / r. The base
parameter names are untouched, so checkpoints, the TP key rule table and released weights keep
their keys; the rule table (`osp.stage2_train.state_dict_adapter`) also splits the adapters.

Per layout (N = TP size), the adapter reuses the collective its base linear uses, on r-wide tensors:
* column-parallel base (q, k, v, ff.net.0.proj; rows split): A replicated, B split like the base output.
    SP (input is a sequence shard): a = A x_shard, all-gathered over TP (backward reduce-scatter);
        A consumed on shards -> tagged `sequence_parallel` (its grad is SUMmed over TP after backward);
    no SP (input replicated, e.g. the cross-attention k/v on the replicated text): a = A x through
        copy_to (identity forward, all-reduce backward): A's grad is complete on every rank.
* row-parallel base (to_out.0, ff.net.2; columns split): A split like the base input, B replicated.
    a = A_r x_r are partial sums, reduced like the base output (all-reduce, or reduce-scatter under SP);
    under SP B then runs on sequence shards -> tagged `sequence_parallel`.
* CP: nothing to add: adapters are per-token maps and live in `transformer_blocks.*`, whose grads the
  trainer already sums over CP.
* fused q/k/v: the model concatenates the q/k/v weights per call (`dit.fused_linear`) and runs them
  through the first module's `fused_forward`; the plan replaces that per instance: the base GEMM plus
  one GEMM over the concatenated A's of the group (one r-wide collective), then each member's B: the
  output columns stay [q | k | v] of this rank.

The base runs through megatron's frozen-weight linear (no weight gradient, only the weight saved).
Why not peft: the model reads q/k/v (and ff.net.2 with the GELU fused into it) weights directly for
its fused GEMMs, so peft's wrapper layers would be bypassed there; peft's megatron layers expect
megatron's tuple-returning forward, do not tag replicated adapter factors for the SP gradient sum,
and rename the base parameters (`base_layer.weight`). The exported adapter uses peft's layout.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from osp.common.errors import OspError
from osp.common.models.dit import gelu_linear
from osp.stage2_train.config import LORA_TARGETS
from osp.stage2_train.layout import Layout
from osp.stage2_train.parallel import plan_layout
from osp.stage2_train.state_dict_adapter import shard_tensor

A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"
# the block linears an adapter may target: name inside a block -> TP kind of the base
LAYERS = {
    "attn1.to_q": "column",
    "attn1.to_k": "column",
    "attn1.to_v": "column",
    "attn1.to_out.0": "row",
    "attn2.to_q": "column",
    "attn2.to_k": "column",
    "attn2.to_v": "column",
    "attn2.to_out.0": "row",
    "ff.net.0.proj": "column",
    "ff.net.2": "row",
}
# linears the model runs as one GEMM (osp.common.models.dit.Attention.forward): head -> members in order
FUSED = {"attn1.to_q": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn2.to_k": ("attn2.to_k", "attn2.to_v")}
BLOCKS = "transformer_blocks"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class LoraError(OspError, ValueError):
    """A LoRA setting or adapter file that does not fit the model (one line: the setting, the fix)."""


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    base_dtype: str = "bf16"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, c: Any) -> LoraSpec:
        """From the [lora] config section."""
        return cls(int(c.rank), float(c.alpha), float(c.dropout), tuple(c.targets), str(c.base_dtype))


@dataclass
class _Info:  # what an adapted linear's forward needs (a plain attribute: not a parameter, not a module)
    kind: str  # column | row
    scale: float
    dropout: float
    layout: Layout
    sp: bool  # the base's input (column) / output (row) is a sequence shard


def is_adapter_key(key: str) -> bool:
    return key.endswith((A_KEY, B_KEY))


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "_osp_lora", None) is not None


def adapter_module(key: str) -> str:
    """`transformer_blocks.0.attn1.to_q.lora_A.weight` -> `transformer_blocks.0.attn1.to_q`."""
    return key[: -len(A_KEY)] if key.endswith(A_KEY) else key[: -len(B_KEY)]


def layer_names(num_layers: int) -> list[str]:
    return [f"{BLOCKS}.{i}.{n}" for i in range(num_layers) for n in LAYERS]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatchcase(name, target)


def select_layers(targets: tuple[str, ...] | list[str], num_layers: int) -> list[str]:
    """The block linears the `lora.targets` patterns select (a full name, a dotted suffix such as
    `to_q` or `attn2.to_k`, or an fnmatch pattern such as `transformer_blocks.1*.ff.*`)."""
    names = layer_names(num_layers)
    if not targets:
        raise LoraError(f"lora.targets is empty; choose among the layers of every block: {', '.join(LAYERS)}")
    chosen: set[str] = set()
    for t in targets:
        hit = [n for n in names if _matches(n, t)]
        if not hit:
            raise LoraError(
                f"lora.targets: {t!r} matches no layer; available layers (in each of the {num_layers} blocks "
                f"{BLOCKS}.<i>.): {', '.join(LAYERS)}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


def _full_widths(lin: nn.Module) -> tuple[int, int]:
    """(in, out) of the whole (TP=1) linear: megatron layers keep them as input_size / output_size."""
    if hasattr(lin, "input_size"):
        return int(cast(Any, lin).input_size), int(cast(Any, lin).output_size)
    return int(cast(Any, lin).in_features), int(cast(Any, lin).out_features)


def _suffix(name: str) -> str:
    return name.split(".", 2)[2]  # transformer_blocks.<i>.<suffix>


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, spec: LoraSpec, cast_base: bool = True) -> nn.Module:
    """Add adapters to the linears `spec.targets` selects, freeze every base parameter (cast to
    `spec.base_dtype` unless not `cast_base`) and extend the forwards, in place, after the TP/SP and
    CP plans. On meta the adapters stay on meta (their values come from `init_adapters` or a checkpoint)."""
    if has_lora(model):
        raise RuntimeError("LoRA is already applied to this model")
    cfg = cast(Any, model).config
    if spec.base_dtype not in BASE_DTYPES:
        raise LoraError(f"lora.base_dtype={spec.base_dtype!r} must be one of {', '.join(BASE_DTYPES)}")
    if not 0.0 <= spec.dropout < 1.0:
        raise LoraError(f"lora.dropout={spec.dropout} must be in [0, 1)")
    if spec.alpha <= 0:
        raise LoraError(f"lora.alpha={spec.alpha} must be > 0")
    names = select_layers(spec.targets, cfg.num_layers)
    layout = plan_layout(model)
    tp = layout.tp
    for name in names:
        lin = model.get_submodule(name)
        fan_in, fan_out = _full_widths(lin)
        if not 1 <= spec.rank <= min(fan_in, fan_out):
            raise LoraError(
                f"lora.rank={spec.rank} does not fit {name} ({fan_in} -> {fan_out}); choose a rank in "
                f"[1, {min(fan_in, fan_out)}]"
            )
    model.requires_grad_(False)
    if cast_base:
        base_dtype = BASE_DTYPES[spec.base_dtype]
        for p in model.parameters():
            p.data = p.data.to(base_dtype)
    for name in names:
        lin = model.get_submodule(name)
        kind = LAYERS[_suffix(name)]
        fan_in, fan_out = _full_widths(lin)
        sp = tp > 1 and bool(getattr(lin, "sequence_parallel", False))
        a_in = fan_in // tp if kind == "row" else fan_in
        b_out = fan_out // tp if kind == "column" else fan_out
        dev = lin.weight.device
        lin.lora_A = nn.Linear(a_in, spec.rank, bias=False, device=dev, dtype=torch.float32)
        lin.lora_B = nn.Linear(spec.rank, b_out, bias=False, device=dev, dtype=torch.float32)
        if sp:  # the factor that runs on sequence shards: its grad is summed over TP after backward
            tagged = lin.lora_A.weight if kind == "column" else lin.lora_B.weight
            tagged.sequence_parallel = True  # pyright: ignore[reportAttributeAccessIssue] (megatron's flag)
        cast(Any, lin)._lora = _Info(kind, spec.scale, spec.dropout, layout, sp)
    for i in range(cfg.num_layers):
        for suffix, kind in LAYERS.items():
            lin = model.get_submodule(f"{BLOCKS}.{i}.{suffix}")
            if kind == "column":
                cast(Any, lin).forward = types.MethodType(_column_forward, lin)
            elif hasattr(lin, "_lora"):
                cast(Any, lin).forward = types.MethodType(_row_forward, lin)
                if suffix == "ff.net.2":
                    cast(Any, lin).forward_gelu_input = types.MethodType(_row_forward_gelu_input, lin)
        for head, members in FUSED.items():
            lin = model.get_submodule(f"{BLOCKS}.{i}.{head}")
            cast(Any, lin)._lora_fused = tuple(model.get_submodule(f"{BLOCKS}.{i}.{m}") for m in members)
            cast(Any, lin).fused_forward = types.MethodType(_fused_forward, lin)
    cast(Any, model)._osp_lora = spec
    return model


def adapted(model: nn.Module) -> list[str]:
    """Names of the linears holding adapters, in model order."""
    return [n for n, m in model.named_modules() if hasattr(m, "_lora")]


# ------------------------------------------------------------------------------------------------
# forwards (bound per instance by apply_lora)
# ------------------------------------------------------------------------------------------------
def _tp():
    from osp.stage2_train.parallel import _megatron

    return _megatron()[2]


def _drop(x: torch.Tensor, info: _Info, training: bool) -> torch.Tensor:
    return F.dropout(x, info.dropout, training) if info.dropout > 0 else x


def _base_column(lin: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The base linear with frozen weights: megatron's frozen-weight path under TP (no weight gradient,
    only the weight saved; the SP all-gather inside), F.linear at TP=1."""
    if not hasattr(lin, "tp_group"):
        return F.linear(x, w, b)
    sp = bool(cast(Any, lin).sequence_parallel)
    if w.requires_grad:  # a trainable base (not under LoRA): the layer's own path
        return type(lin).fused_forward(lin, x, w, b)  # pyright: ignore[reportAttributeAccessIssue]
    from megatron.core.tensor_parallel.layers import linear_with_frozen_weight

    return linear_with_frozen_weight(
        x,
        w,
        b,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=not sp,
        sequence_parallel=sp,
        tp_group=cast(Any, lin).tp_group,
    )


def _column_a(info: _Info, a_weight: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
    """A x for a column-parallel base: full sequence, identical on the TP ranks, ready for the local B rows."""
    a = F.linear(_drop(x, info, training), a_weight.to(x.dtype))
    L = info.layout
    if L.tp == 1:
        return a
    if info.sp:
        return _tp().gather_from_sequence_parallel_region(a, tensor_parallel_output_grad=True, group=L.tp_group)
    return _tp().copy_to_tensor_model_parallel_region(a, group=L.tp_group)


def _b(lin: nn.Module, a: torch.Tensor) -> torch.Tensor:
    info = cast(_Info, lin._lora)
    return F.linear(a, cast(nn.Linear, lin.lora_B).weight.to(a.dtype) * info.scale)


def _column_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dt = x.dtype
    bias = cast(Any, self).bias
    out = _base_column(self, x, cast(torch.Tensor, self.weight).to(dt), None if bias is None else bias.to(dt))
    if not hasattr(self, "_lora"):
        return out
    a = _column_a(cast(_Info, self._lora), cast(nn.Linear, self.lora_A).weight, x, self.training)
    return out + _b(self, a)


def _fused_forward(self: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The group's one GEMM (w, b: the members' local weights concatenated) plus every member's
    adapter: one GEMM over the concatenated A's, one r-wide collective, then each member's B."""
    members = cast(tuple, self._lora_fused)
    widths = [int(m.weight.shape[0]) for m in members]
    if w.shape[0] != sum(widths):
        raise RuntimeError(f"fused GEMM of {w.shape[0]} rows does not match its members' {widths}")
    out = _base_column(self, x, w, b)
    lora = [m for m in members if hasattr(m, "_lora")]
    if not lora:
        return out
    a = _column_a(lora[0]._lora, torch.cat([m.lora_A.weight for m in lora]), x, self.training)
    parts = iter(a.split([int(m.lora_A.weight.shape[0]) for m in lora], dim=-1))
    deltas = [
        _b(m, next(parts)) if hasattr(m, "_lora") else out.new_zeros(*out.shape[:-1], n)
        for m, n in zip(members, widths)
    ]
    return out + torch.cat(deltas, dim=-1)


def _row_reduce(info: _Info, a: torch.Tensor) -> torch.Tensor:
    """Partial sums A_r x_r -> reduced like the base output (all-reduce, or reduce-scatter under SP)."""
    L = info.layout
    if L.tp == 1:
        return a
    if info.sp:
        return _tp().reduce_scatter_to_sequence_parallel_region(a, group=L.tp_group)
    return _tp().reduce_from_tensor_model_parallel_region(a, group=L.tp_group)


def _row_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = type(self).forward(self, x)
    info = cast(_Info, self._lora)
    a = F.linear(_drop(x, info, self.training), cast(nn.Linear, self.lora_A).weight.to(x.dtype))
    return out + _b(self, _row_reduce(info, a))


def _row_forward_gelu_input(self: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """ff.net.2 on the GELU pre-activation: the adapter also reads GELU(pre) without keeping it."""
    dt = pre.dtype
    base = getattr(type(self), "forward_gelu_input", None)
    if base is not None:
        out = base(self, pre)
    else:
        bias = cast(Any, self).bias
        out = gelu_linear(pre, cast(torch.Tensor, self.weight).to(dt), None if bias is None else bias.to(dt))
    info = cast(_Info, self._lora)
    a_w = cast(nn.Linear, self.lora_A).weight.to(dt)
    if info.dropout > 0:
        a = F.linear(_drop(F.gelu(pre, approximate="tanh"), info, self.training), a_w)
    else:
        a = gelu_linear(pre, a_w)
    return out + _b(self, _row_reduce(info, a))


# ------------------------------------------------------------------------------------------------
# values: init, state, merge
# ------------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def full_init(name: str, fan_in: int, rank: int, fan_out: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """peft's default init of one adapter (full TP=1 shapes): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    bound = 1.0 / math.sqrt(fan_in)
    a = (torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound
    return {name + A_KEY: a, name + B_KEY: torch.zeros(fan_out, rank)}


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """The seeded adapter init of a new run, equal at every TP size (full tensors drawn, then sharded)."""
    layout = plan_layout(model)
    g = torch.Generator().manual_seed(seed)
    local = adapter_state(model)
    spec = cast(LoraSpec, cast(Any, model)._osp_lora)
    for name in adapted(model):
        fan_in, fan_out = _full_widths(model.get_submodule(name))
        for k, v in full_init(name, fan_in, spec.rank, fan_out, g).items():
            local[k].copy_(shard_tensor(k, v, layout.tp, layout.tp_rank))


@torch.no_grad()
def load_adapters(model: nn.Module, full: dict[str, torch.Tensor], source: str) -> None:
    """Full (TP=1) adapter tensors into an adapted model: each rank copies its shard. Keys and shapes
    must be exactly the model's (one line naming the first difference)."""
    layout = plan_layout(model)
    local = adapter_state(model)
    for k in sorted(set(local) | set(full)):
        if k not in full or k not in local:
            what = "lacks" if k not in full else "has an adapter the model does not have:"
            raise LoraError(f"{source}: {what} {k}; apply it with the lora.targets / rank it was trained with")
        piece = shard_tensor(k, full[k], layout.tp, layout.tp_rank)
        if piece.shape != local[k].shape:
            raise LoraError(
                f"{source}: {k} has shape {tuple(full[k].shape)}, which does not fit this model; the adapter was "
                "trained on another base (preset / config.json)"
            )
        local[k].copy_(piece)


def check_base(adapters: dict[str, torch.Tensor], base_shapes: dict[str, Any], source: str) -> int:
    """Refuse adapters whose base model differs: one line naming the first key that does not fit.
    Returns the rank."""
    ranks = set()
    for k in sorted(adapters):
        if not is_adapter_key(k):
            raise LoraError(f"{source}: {k} is not a LoRA tensor (<layer>.lora_A.weight / .lora_B.weight)")
        wk = adapter_module(k) + ".weight"
        shape = tuple(adapters[k].shape)
        if wk not in base_shapes:
            raise LoraError(f"{source}: {k} has no base layer {wk}; the adapter was trained on another base model")
        out_f, in_f = tuple(base_shapes[wk])
        want = (shape[0], in_f) if k.endswith(A_KEY) else (out_f, shape[1])
        if shape != want:
            raise LoraError(
                f"{source}: {k} has shape {shape} but the base layer {wk} is {out_f} x {in_f}; the adapter was "
                "trained on another base model (preset / config.json): pass that base"
            )
        ranks.add(shape[0] if k.endswith(A_KEY) else shape[1])
        other = adapter_module(k) + (B_KEY if k.endswith(A_KEY) else A_KEY)
        if other not in adapters:
            raise LoraError(f"{source}: {k} comes without {other}; the adapter is incomplete")
    if len(ranks) != 1:
        raise LoraError(f"{source}: the adapters have ranks {sorted(ranks)}; one rank per adapter folder is supported")
    return ranks.pop()


def attach(model: nn.Module, spec: LoraSpec, adapters: dict[str, torch.Tensor], scale: float, source: str):
    """Inference: apply full (TP=1) adapters to a loaded (possibly TP-split) DiT without merging them:
    the base keeps its weights and dtype, the output scale is spec.scale x `scale`. Adapters trained on
    another base are refused (one line naming the first key that does not fit)."""
    from osp.common.models.dit import build_dit
    from osp.stage2_train.state_dict_adapter import tensor_shapes

    check_base(adapters, tensor_shapes(build_dit(cast(Any, model).config, device="meta")), source)
    modules = tuple(sorted({adapter_module(k) for k in adapters}))
    apply_lora(model, LoraSpec(spec.rank, spec.alpha, 0.0, modules), cast_base=False)
    for name in adapted(model):
        cast(_Info, model.get_submodule(name)._lora).scale *= scale
    load_adapters(model, adapters, source)
    return model.requires_grad_(False)


@torch.no_grad()
def merge_state_dict(
    base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """Full TP=1 weights with every adapter folded in: W + scale * B @ A, in fp32 (the other tensors
    as they are)."""
    out = dict(base)
    for k in adapters:
        if k.endswith(A_KEY):
            m = adapter_module(k)
            delta = adapters[m + B_KEY].float() @ adapters[k].float()
            out[m + ".weight"] = base[m + ".weight"].float() + scale * delta
    return out


# ------------------------------------------------------------------------------------------------
# the peft layout (adapter_model.safetensors + adapter_config.json)
# ------------------------------------------------------------------------------------------------
def peft_config(spec: LoraSpec, modules: list[str], base: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "task_type": None,
        "modules_to_save": None,
        "base_model_name_or_path": base,
    }


def write_peft(out: str | Path, adapters: dict[str, torch.Tensor], spec: LoraSpec, base: str | None) -> Path:
    """An adapter folder peft reads (`PeftModel.from_pretrained(dit, out)`; diffusers reads the same keys)."""
    from osp.stage2_train.state_dict_adapter import save_tensors

    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    save_tensors({PEFT_PREFIX + k: v.float() for k, v in adapters.items()}, o / PEFT_WEIGHTS)
    modules = sorted({adapter_module(k) for k in adapters})
    (o / PEFT_CONFIG).write_text(json.dumps(peft_config(spec, modules, base), indent=2) + "\n")
    return o


def is_peft_folder(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and (Path(path) / PEFT_WEIGHTS).is_file()


def read_peft(path: str | Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """(spec, full adapter tensors under osp's names) of a peft-layout adapter folder."""
    from osp.stage2_train.state_dict_adapter import read_safetensors

    d = Path(path)
    try:
        c = json.loads((d / PEFT_CONFIG).read_text())
        spec = LoraSpec(int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0))
    except (ValueError, KeyError, TypeError) as e:
        raise LoraError(f"{d / PEFT_CONFIG}: not a LoRA adapter config ({e}); export it again") from None
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("use_rslora"):
        raise LoraError(f"{d / PEFT_CONFIG}: only plain LoRA adapters (no DoRA / rsLoRA) can be applied")
    raw = read_safetensors(d / PEFT_WEIGHTS)
    sd = {}
    for k, v in raw.items():
        name = (
            k.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        )
        sd[name] = v
    return spec, sd
