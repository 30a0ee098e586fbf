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

A roofline step-time estimate for 8 x H100 SXM (TP=2 + SP, DP=4) follows from the counts: an ESTIMATE,
not a measurement, with the device rates printed. Usage: python bench/step_proxies.py
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

PRESET, GRID, TEXT_LEN, BATCH, LAYERS = "osp12-93x480p", (24, 30, 40), 512, 1, 32
# H100 SXM rates of the roofline estimate (nominal dense bf16 peak; achieved fractions are assumptions)
PEAK_TFLOPS = 989.0
GEMM_TFLOPS = 0.75 * PEAK_TFLOPS  # large bf16 GEMMs
ATTN_TFLOPS = 450.0  # flash / cuDNN attention fwd+bwd at head dim 96
HBM_TBPS = 0.8 * 3.35  # memory-bound kernels
LINK_GBPS = 360.0  # NVLink all-gather / reduce-scatter bus bandwidth per GPU
TARGETS = {"mem": 0.25, "allgather": 0.4, "saved": 0.6, "recompute": 0.05, "mfu": 40.0}

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
    flops: dict = field(default_factory=lambda: {"gemm": 0, "attn": 0})
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
    from osp.stage2_train.parallel import parallelize

    cfg = replace(get_dit_config(PRESET), num_layers=1)
    model = build_dit(cfg)
    if tp > 1:
        model = parallelize(model, sequence_parallel=True)
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
        model.checkpointing = ckpt
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


def roofline(c: Counts, tp: int, mem: int, params_per_rank: int, dp: int) -> dict:
    """Step-time estimate (s) of LAYERS blocks + DP gradient all-reduce + AdamW + EMA on one H100."""
    block = (
        c.flops["gemm"] / (GEMM_TFLOPS * 1e12)
        + c.flops["attn"] / (ATTN_TFLOPS * 1e12)
        + mem / (HBM_TBPS * 1e12)
        + (c.coll["allgather"] + c.coll["reducescatter"] + 2 * c.coll["allreduce"]) * (tp - 1) / tp / (LINK_GBPS * 1e9)
    )
    dp_ar = 2 * (dp - 1) / dp * params_per_rank * 4 / (LINK_GBPS * 1e9)  # fp32 grads, ring all-reduce
    optim = params_per_rank * (28 + 12 + 4) / (HBM_TBPS * 1e12)  # AdamW (p, g, m, v) + EMA + grad-norm bytes
    return {
        "block": block,
        "blocks": LAYERS * block,
        "dp": dp_ar,
        "optim": optim,
        "step": LAYERS * block + dp_ar + optim,
    }


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

    model_flops = LAYERS * n0.total_flops  # per rank, no recompute
    print(
        f"\nroofline ESTIMATE, 8xH100 SXM (TP=2+SP, DP=4), device rates: peak {PEAK_TFLOPS:.0f} TFLOP/s bf16 dense, "
        f"GEMM {GEMM_TFLOPS:.0f}, attention {ATTN_TFLOPS:.0f} TFLOP/s, HBM {HBM_TBPS:.2f} TB/s, NVLink {LINK_GBPS:.0f} GB/s; "
        f"{LAYERS} blocks + DP all-reduce + AdamW + EMA (no overlap assumed)"
    )
    est = {}
    for name, c, mem in (
        ("baseline (full recompute, eager)", tf, tf.mem_eager),
        ("new, no recompute, eager", n0, n0.mem_eager),
        ("new, selective, eager", ns, ns.mem_eager),
        ("new, selective, compiled", ns, ns.mem_fused),
        ("new, no recompute, compiled", n0, n0.mem_fused),
    ):
        r = roofline(c, 2, mem, params_rank, 4)
        est[name] = 100 * model_flops / (r["step"] * PEAK_TFLOPS * 1e12)
        print(
            f"  {name}: step {r['step']:.3f} s (blocks {r['blocks']:.3f}, DP {r['dp'] * 1e3:.1f} ms, optimizer+EMA "
            f"{r['optim'] * 1e3:.1f} ms) -> MFU {est[name]:.1f} %"
        )
    layout = "TP=2+SP, bf16, selective, compiled"
    print(f"roofline MFU estimate (8xH100, 93x480p, {layout}): {est['new, selective, compiled']:.1f} %")
    return 0


def build_meta_params():
    """Parameters of one TP=2 rank of the full 32-block model (counted on the meta device)."""
    from osp.common.convert import tp_split_dim
    from osp.common.models.dit import build_dit

    m = build_dit(PRESET, device="meta")
    for n, p in m.named_parameters():
        yield p if tp_split_dim(n) is None else p.new_empty(p.numel() // 2)


if __name__ == "__main__":
    raise SystemExit(main())
