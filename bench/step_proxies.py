"""CPU-countable proxies of one training step at REAL size, as ratios new / baseline in one run.

One real-width DiT block (D 2304, 24 heads x 96, osp12-93x480p: S = 24 x 30 x 40 = 28,800 video
tokens, L = 512 text tokens with a text mask, batch 1) runs forward + backward on fake tensors
(FakeTensorMode: shapes and dtypes, no data) at TP=1 and TP=2 + SP (megatron-core plan over a fake
2-rank process group). A dispatch-level tracer counts, per block per rank:

* memory-bound bytes: every op that is not a GEMM, an attention kernel, a collective or a view reads
  its inputs and writes its outputs. "eager" sums them per op; "fused" models what `model.compile`
  (inductor) emits: connected elementwise/reduction ops of one pass (forward or backward) become one
  kernel that reads its external inputs and writes only what is used outside it;
* collective bytes (all-gather outputs, reduce-scatter inputs, all-reduce sizes);
* saved-activation bytes: storages created in the block's forward that are still alive after it
  (tensors saved for backward, selective-recompute caches, the output), parameters excluded;
* FLOPs: GEMMs 2mnk, attention 4 B h Sq Skv hd forward and 2x that backward; recompute overhead =
  extra FLOPs of a checkpointing mode over no checkpointing.

"baseline" is the block in a CUDA bf16-autocast training regime, re-expressed with explicit casts because
CUDA autocast cannot run on CPU fake tensors: the CUDA bf16 autocast rules (GEMMs and SDPA in bf16,
LayerNorm in fp32, megatron's fp32 bias add after the bf16 GEMM, fp32 scale_shift_table), three q/k/v
linears (three SP all-gathers), RoPE as rotate-half with cos/sin in the activation dtype, full per-block
recompute (the real-run config's `grad_checkpointing = true`). "new" is osp's DiT block as it is.

A roofline step-time estimate for 8 x H100 SXM (TP=2 + SP, DP=4) follows from the counts through the one
roofline model (osp.stage2_train.roofline: pinned device rates, model vs hardware FLOPs): an ESTIMATE, not a
measurement. Memory-bound bytes are the eager per-op counts; the "fused" figure is a fusion model (an upper
bound on what compiling saves), labelled so. Then the estimate for the shipped 93x480p config's own attention
backend and compile setting; the last line is the estimate for the layout `osp plan` ranks first on 8 x H100
(the config's attention backend), with the range across attention backends.
Usage: python bench/step_proxies.py
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from osp.stage2_train import roofline as R

PRESET, GRID, TEXT_LEN, BATCH, LAYERS = "osp12-93x480p", (24, 30, 40), 512, 1, 32
CONFIG = Path(__file__).resolve().parents[1] / "stage2_train" / "configs" / "osp12-93x480p.toml"
CARD, WORLD = "h100-80gb", 8
TARGETS = {"mem": 0.25, "allgather": 0.4, "saved": 0.6, "recompute": 0.05}

VIEW_OPS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "alias",
    "as_strided",
    "detach",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "_unsafe_split",
    "unflatten",
    "reshape",
    "flatten",
    "view_as",
    "expand_as",
    "numpy_T",
}
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def _nbytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


@dataclass
class Node:
    kind: str  # mem | gemm | attn | coll
    phase: str
    ins: list[int]
    outs: list[int]
    name: str


@dataclass
class Counts:
    flops: dict = field(default_factory=lambda: {"gemm": 0, "attn": 0})  # attn: every attention kernel (bwd 2x fwd)
    attn_fwd: int = 0  # attention forward kernels of the forward pass
    attn_recompute: int = 0  # attention forward kernels run again in the backward pass (recompute)
    mem_eager: int = 0
    mem_fused: int = 0
    coll: dict = field(default_factory=lambda: {"allgather": 0, "reducescatter": 0, "allreduce": 0})
    saved: int = 0

    @property
    def total_flops(self) -> int:
        return self.flops["gemm"] + self.flops["attn"]


class Tracer(TorchDispatchMode):
    """Records every op of a forward + backward: kind, phase, tensor keys (views alias their base)."""

    def __init__(self):
        super().__init__()
        self.nodes: list[Node] = []
        self.key: dict[int, int] = {}
        self.size: list[int] = []
        self.keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.phase = "fwd"
        self.counts = Counts()

    def _k(self, t: torch.Tensor, new: bool = False) -> int:
        if new or id(t) not in self.key:
            self.key[id(t)] = len(self.size)
            self.size.append(_nbytes(t))
            self.keep.append(t)
        return self.key[id(t)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if func.namespace != "c10d" and not outs:  # metadata queries (prim.device, aten.is_nonzero, ...)
            return out
        if name in VIEW_OPS:
            if ins:
                for o in outs:
                    self.key[id(o)] = self._k(ins[0])
                    self.keep.append(o)
            else:
                for o in outs:
                    self._k(o, new=True)
            return out
        in_keys = [self._k(t) for t in ins]
        out_keys = [self.key[id(o)] if id(o) in self.key else self._k(o, new=True) for o in outs]
        c = self.counts
        if func.namespace == "c10d":
            kind = "coll"
            if "allgather" in name:
                c.coll["allgather"] += sum(_nbytes(t) for t in ins[:1])  # output buffer (first arg)
            elif "reduce_scatter" in name:
                c.coll["reducescatter"] += _nbytes(ins[1])  # input (second arg)
            elif "allreduce" in name:
                c.coll["allreduce"] += sum(_nbytes(t) for t in ins if t.is_floating_point())
        elif name in GEMM_OPS:
            kind = "gemm"
            a, b = (ins[-2], ins[-1])
            c.flops["gemm"] += 2 * a.numel() * b.shape[-1]
        elif "attention" in name:
            kind = "attn"
            q, k = ins[0], ins[1]
            if "backward" in name:
                q, k = ins[1], ins[2]  # (grad_out, q, k, v, ...)
            f = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
            c.flops["attn"] += 2 * f if "backward" in name else f
            if "backward" not in name:
                if self.phase == "fwd":
                    c.attn_fwd += f
                else:
                    c.attn_recompute += f
        else:
            kind = "mem"
            c.mem_eager += sum(self.size[k] for k in in_keys) + sum(self.size[k] for k in out_keys)
        self.nodes.append(Node(kind, self.phase, in_keys, out_keys, name))
        return out

    def fused_bytes(self) -> int:
        """Memory-bound bytes if connected elementwise/reduction ops of one pass were one kernel each."""
        parent = list(range(len(self.nodes)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        producer: dict[int, int] = {}
        for i, n in enumerate(self.nodes):
            if n.kind == "mem":
                for k in n.ins:
                    p = producer.get(k)
                    if p is not None and self.nodes[p].kind == "mem" and self.nodes[p].phase == n.phase:
                        parent[find(i)] = find(p)
            for k in n.outs:
                producer[k] = i
        consumers: dict[int, set[int]] = {}
        for i, n in enumerate(self.nodes):
            for k in n.ins:
                consumers.setdefault(k, set()).add(find(i) if n.kind == "mem" else -1 - i)
        groups: dict[int, tuple[set, set]] = {}
        for i, n in enumerate(self.nodes):
            if n.kind != "mem":
                continue
            reads, writes = groups.setdefault(find(i), (set(), set()))
            reads.update(n.ins)
            writes.update(n.outs)
        total = 0
        for g, (reads, writes) in groups.items():
            total += sum(self.size[k] for k in reads - writes)
            for k in writes:
                used = consumers.get(k, set())
                if not used or used - {g}:
                    total += self.size[k]
        return total


class SavedTracker(TorchDispatchMode):
    """Storages created during a forward; `alive()` sums those still referenced afterwards."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                st = o.untyped_storage()
                self.refs.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        return out

    def alive(self, exclude: set[int]) -> int:
        gc.collect()
        return sum(n for cd, (r, n) in self.refs.items() if cd not in exclude and not r.expired())


# ------------------------------------------------------------------------------------------------
# the baseline block: CUDA bf16-autocast regime, with explicit casts
# ------------------------------------------------------------------------------------------------
def _rotate_half_3d(x):
    c2 = x.shape[-1] // 6
    x = x.unflatten(-1, (3, 2, c2))
    return torch.stack([-x[..., 1, :], x[..., 0, :]], dim=-2).flatten(-3)


def baseline_block(blk, h, t6, txt, text_bias, angles, tp: int):
    bf = torch.bfloat16
    from megatron.core import tensor_parallel as mtp

    def dense(x, lin):  # nn.Linear under autocast: bf16 GEMM with bias, bf16 out
        return F.linear(x.to(bf), lin.weight.to(bf), lin.bias.to(bf))

    def col(x, lin, seq: bool):  # megatron column linear under autocast: gather in x's dtype, fp32 bias add
        if tp == 1:
            return dense(x, lin)
        return mtp.linear_with_grad_accumulation_and_async_allreduce(
            x,
            lin.weight,
            lin.bias,
            gradient_accumulation_fusion=False,
            allreduce_dgrad=not seq,
            sequence_parallel=seq,
            tp_group=lin.tp_group,
        )

    def row(x, lin):  # megatron row linear: bf16 GEMM, bf16 reduce(-scatter), fp32 bias add
        if tp == 1:
            return dense(x, lin)
        out = torch.matmul(x.to(bf), lin.weight.to(bf).t())
        return mtp.reduce_scatter_to_sequence_parallel_region(out, group=lin.tp_group) + lin.bias

    def heads(x, hd=96):
        s, b, _ = x.shape
        return x.view(s, b, -1, hd).permute(1, 2, 0, 3)

    def rope(x):
        a = angles.to(x.dtype)
        return x * a.cos() + _rotate_half_3d(x) * a.sin()

    def attn(q, k, v, bias=None):  # SDPA under autocast: bf16
        o = F.scaled_dot_product_attention(
            q.to(bf), k.to(bf), v.to(bf), attn_mask=None if bias is None else bias.to(bf)
        )
        b, hh, s, hd = o.shape
        return o.permute(2, 0, 1, 3).reshape(s, b, hh * hd)

    b, d = t6.shape[0], blk.scale_shift_table.shape[-1]
    mod = (t6.view(b, 6, d) + blk.scale_shift_table[None]).permute(1, 0, 2).unsqueeze(1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    ln = lambda x: F.layer_norm(x.float(), x.shape[-1:], eps=blk.eps)  # noqa: E731  (autocast: fp32)
    a1, a2, ff = blk.attn1, blk.attn2, blk.ff
    n = ln(h) * (1 + scale_msa) + shift_msa
    q, k, v = (heads(col(n, m, True)) for m in (a1.to_q, a1.to_k, a1.to_v))
    h = h + gate_msa * row(attn(rope(q), rope(k), v), a1.to_out[0])
    q, k, v = heads(col(h, a2.to_q, True)), heads(col(txt, a2.to_k, False)), heads(col(txt, a2.to_v, False))
    h = h + row(attn(q, k, v, text_bias), a2.to_out[0])
    n = ln(h) * (1 + scale_mlp) + shift_mlp
    f = F.gelu(col(n, ff.net[0].proj, True), approximate="tanh")
    return h + gate_mlp * row(f, ff.net[2])


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def build(tp: int):
    from osp.common.models.dit import build_dit, get_dit_config
    from osp.stage2_train.dist import current_layout
    from osp.stage2_train.parallel import parallelize

    cfg = replace(get_dit_config(PRESET), num_layers=1)
    model = build_dit(cfg)
    if tp > 1:
        model = parallelize(model, current_layout(True))
    return model


def inputs(model, tp: int, regime: str):
    """Block inputs of one rank as the model's forward makes them in that regime."""
    cfg = model.config
    s, d = math.prod(GRID), cfg.inner_dim
    act = torch.bfloat16 if regime == "new" else torch.float32  # baseline: the residual stream is fp32
    h = torch.randn(s // tp, BATCH, d, dtype=act, requires_grad=True)
    t6 = torch.randn(BATCH, 6 * d, dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(TEXT_LEN, BATCH, d, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(BATCH, 1, 1, TEXT_LEN, dtype=torch.bfloat16 if regime == "new" else torch.float32)
    table = model.rope_table(GRID, "cpu")
    return h, t6, txt, bias, table


def run_block(model, tp: int, regime: str, ckpt: str, tracer=None, saved=None) -> torch.Tensor | None:
    blk = model.transformer_blocks[0]
    h, t6, txt, bias, table = inputs(model, tp, regime)
    if regime == "new":
        from osp.stage2_train.plan import apply_ac

        apply_ac(model, ckpt)
        args = (h, t6, txt, bias, table.cos_sin(torch.bfloat16), None)
        fn = lambda: blk(*args)  # noqa: E731
    else:
        args = (blk, h, t6, txt, bias, table.angles, tp)
        fn = (
            (lambda: checkpoint(baseline_block, *args, use_reentrant=False))
            if ckpt == "full"
            else (lambda: baseline_block(*args))
        )  # noqa: E731
    if saved is not None:
        with saved:
            out = fn()
        return out
    with tracer:
        out = fn()
        tracer.phase = "bwd"
        out.backward(torch.ones_like(out))
    return None


def measure(model, tp: int, regime: str, ckpt: str) -> Counts:
    tracer = Tracer()
    run_block(model, tp, regime, ckpt, tracer=tracer)
    c = tracer.counts
    c.mem_fused = tracer.fused_bytes()
    del tracer
    tracker = SavedTracker()
    out = run_block(model, tp, regime, ckpt, saved=tracker)
    from megatron.core import parallel_state

    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    buf = getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)  # megatron's one reused all-gather buffer
    if buf is not None:
        exclude |= {t.untyped_storage()._cdata for t in buf.buffer.values()}
    c.saved = tracker.alive(exclude)
    del out
    model.zero_grad(set_to_none=True)
    return c


def step_counts(c: Counts, mem: int, memory: str, params_per_rank: int, train) -> R.StepCounts:
    """One optimizer step of one rank (LAYERS blocks, TP=2+SP, DP=WORLD/2) in the roofline model's terms."""
    from osp.common.models.dit import get_dit_config

    tp = 2
    block = R.BlockCounts(
        gemm_flops=c.flops["gemm"],
        attn_fwd_flops=c.attn_fwd,
        attn_recompute_flops=c.attn_recompute,
        mem_bytes=mem,
        coll_bytes=c.coll["allgather"] + c.coll["reducescatter"] + 2 * c.coll["allreduce"],
    )
    return R.StepCounts(
        layers=LAYERS,
        block=block,
        model_flops=R.model_flops(get_dit_config(PRESET), math.prod(GRID), TEXT_LEN, BATCH, tp=tp),
        params=params_per_rank,
        tp=tp,
        dp=WORLD // tp,
        memory=memory,
        zero1=train.parallel.zero1,
    )


def main() -> int:
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from osp.common import megatron_cpu

    megatron_cpu.apply(force=True)
    from megatron.core import parallel_state

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=False)
    torch.manual_seed(0)
    res: dict[tuple, Counts] = {}
    for tp in (1, 2):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        model = build(tp)  # real weights of one block (fake tensors are made from them on use)
        with FakeTensorMode(allow_non_fake_inputs=True):
            for regime, ckpt in (
                ("baseline", "none"),
                ("baseline", "full"),
                ("new", "none"),
                ("new", "selective"),
                ("new", "full"),
            ):
                res[(tp, regime, ckpt)] = measure(model, tp, regime, ckpt)
            del model
    params_rank = sum(p.numel() for p in build_meta_params())

    G = 1e9
    print(
        f"step proxies at {PRESET} (S = {math.prod(GRID):,} video + {TEXT_LEN} text tokens, batch {BATCH}), "
        "per block per rank, fake tensors; baseline = the block in a bf16-autocast regime"
    )
    rows = []
    for tp in (1, 2):
        lay = "TP=1" if tp == 1 else "TP=2+SP"
        t0, tf, n0, ns = (
            res[(tp, "baseline", "none")],
            res[(tp, "baseline", "full")],
            res[(tp, "new", "none")],
            res[(tp, "new", "selective")],
        )
        ag_t, ag_n = t0.coll["allgather"], n0.coll["allgather"]
        rec_base = tf.total_flops / t0.total_flops - 1
        rec_sel = ns.total_flops / n0.total_flops - 1
        rows += [
            (lay, "memory-bound GB (eager)", t0.mem_eager / G, n0.mem_eager / G),
            (lay, "memory-bound GB (new fused = model.compile)", t0.mem_eager / G, n0.mem_fused / G),
            (lay, "all-gather GB", ag_t / G, ag_n / G),
            (
                lay,
                "reduce-scatter + all-reduce GB",
                (t0.coll["reducescatter"] + t0.coll["allreduce"]) / G,
                (n0.coll["reducescatter"] + n0.coll["allreduce"]) / G,
            ),
            (lay, "saved activations GB (no recompute)", t0.saved / G, n0.saved / G),
            (lay, "saved activations GB (baseline full / new selective)", tf.saved / G, ns.saved / G),
            (lay, "recompute FLOP overhead (baseline full / new selective)", rec_base, rec_sel),
            (lay, "TFLOP fwd+bwd (no recompute)", t0.total_flops / 1e12, n0.total_flops / 1e12),
        ]
    print("| layout | figure | baseline | new | new / baseline |\n|---|---|---|---|---|")
    for lay, what, a, b in rows:
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"| {lay} | {what} | {a:.3f} | {b:.3f} | {ratio} |")

    t0, tf, n0, ns = (
        res[(2, "baseline", "none")],
        res[(2, "baseline", "full")],
        res[(2, "new", "none")],
        res[(2, "new", "selective")],
    )
    checks = [
        ("memory-bound bytes (new fused vs baseline)", n0.mem_fused / t0.mem_eager, TARGETS["mem"]),
        ("all-gather bytes", n0.coll["allgather"] / t0.coll["allgather"], TARGETS["allgather"]),
        ("saved activations (new selective vs baseline without recompute)", ns.saved / t0.saved, TARGETS["saved"]),
        ("saved activations (both without recompute)", n0.saved / t0.saved, TARGETS["saved"]),
        ("selective recompute FLOP overhead", ns.total_flops / n0.total_flops - 1, TARGETS["recompute"]),
    ]
    print("\nat 93x480p TP=2+SP:")
    for what, v, tgt in checks:
        print(f"  {what}: {v:.3f} (target <= {tgt}) {'met' if v <= tgt else 'MISSED'}")

    from osp.stage2_train.config import TrainConfig

    train = TrainConfig.load(CONFIG)
    card = R.get_card(CARD)
    rates = ", ".join(f"{k} {f:.0f}/{b:.0f}" for k, (f, b) in card.attention.items())
    print(
        f"\nroofline ESTIMATE, {WORLD}x{card.title} (TP=2+SP, DP={WORLD // 2}{', ZeRO-1' if train.parallel.zero1 else ''}), "
        f"pinned rates: peak {card.peak_tflops:.0f} TFLOP/s bf16 dense, GEMM {card.gemm_tflops:.0f}, attention fwd/bwd "
        f"{rates} (bwd in the 2.5x flash convention), HBM {card.hbm_tbps} TB/s, NVLink {card.link_gbps:.0f} GB/s; "
        f"{LAYERS} blocks + DP all-reduce + AdamW + EMA, nothing overlapped. MFU = model FLOPs / (step x peak), "
        "HFU = hardware FLOPs (recompute, flash backward 2.5x) / (step x peak)"
    )
    for name, c, mem, memory in (
        ("baseline (full recompute)", tf, tf.mem_eager, "eager"),
        ("new, no recompute", n0, n0.mem_eager, "eager"),
        ("new, selective", ns, ns.mem_eager, "eager"),
        ("new, selective", ns, ns.mem_fused, "fusion-model (an upper bound on compile's savings, not a count)"),
    ):
        r = R.estimate_range(step_counts(c, mem, memory, params_rank, train), card, train.model.attention_backend)
        h = r.headline
        each = ", ".join(f"{k} {100 * e.mfu:.1f} %" for k, e in r.by_backend.items())
        print(
            f"  {name}, {memory} memory traffic: step {h.step_s:.3f} s at {h.backend} -> MFU {100 * h.mfu:.1f} % "
            f"(HFU {100 * h.hfu:.1f} %; model {h.model_flops / 1e12:.1f} / hardware {h.hardware_flops / 1e12:.1f} TFLOP "
            f"per rank); by backend: {each}"
        )
    # the shipped config's own regime; memory traffic stays the eager count unless compiled traffic was counted
    sel = {"selective": ns, "none": n0, "full": res[(2, "new", "full")]}[train.model.checkpointing]
    r = R.estimate_range(
        step_counts(sel, sel.mem_eager, "eager", params_rank, train), card, train.model.attention_backend
    )
    layout = f"TP=2+SP DP={WORLD // 2}{' ZeRO-1' if train.parallel.zero1 else ''} {train.model.checkpointing}"
    if train.model.compile:
        layout += ", compiled run with eager traffic (compiled traffic not counted)"
    print(f"shipped config: {R.headline_line(r, f'{WORLD}xH100, 93x480p, {layout}')}")

    # the layout `osp plan` ranks first on the same cluster (its counts: the Trainer on meta, osp.stage2_train.planner)
    from osp.stage2_train import planner

    p = planner.plan(PRESET, 1, WORLD, CARD, WORLD, backend=train.model.attention_backend)
    best = planner.first_fitting(p)
    assert best.estimate is not None
    print(
        f"osp plan's first layout of {len(p.rows)} ({sum(r.fits for r in p.rows)} fit): {best.layout.name()}, "
        f"peak {best.peak / 2**30:.1f} GiB per rank"
    )
    print(R.headline_line(best.estimate, f"{WORLD}xH100, 93x480p, {best.layout.name()}"))
    return 0


def build_meta_params():
    """Parameters of one TP=2 rank of the full 32-block model (counted on the meta device)."""
    from osp.stage2_train.state_dict_adapter import tp_split_dim
    from osp.common.models.dit import build_dit

    m = build_dit(PRESET, device="meta")
    for n, p in m.named_parameters():
        yield p if tp_split_dim(n) is None else p.new_empty(p.numel() // 2)


if __name__ == "__main__":
    raise SystemExit(main())
