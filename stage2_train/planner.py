"""`osp plan`: every valid layout of a preset on a cluster, ranked by the estimated time to train.

    osp plan --preset osp12-93x720p --nodes 1 --gpus 8 --card h100-80gb --global-batch 8 --samples 1e6

A layout is TP (with SP when TP > 1) x CP x DP, ZeRO-1 on or off, activation checkpointing none / selective /
full, and a micro-batch x gradient accumulation that makes the global batch. Each is evaluated with the dry
run's own measurements, not formulas: the real Trainer runs on `meta` under the fake process group
(`osp.stage2_train.dryrun`) with 1 and 2 transformer blocks at micro-batch 1 and 2 for every distinct (TP, CP),
one steady optimizer step per checkpointing mode, DDP and ZeRO-1 on. Every block has the same shapes and every
per-sample tensor scales with the batch, so a figure at the preset's depth and micro-batch is the bilinear
extension of the four measured points (`at`):

  peak            the high-water mark of live storages in a step, above what the rank holds between steps
  held state      parameters, gradients (DDP's buckets: fp32, every local gradient), AdamW m and v (this rank's
                  ZeRO-1 partition: torch's greedy split, the largest rank), the EMA (its DP-owner split, the
                  largest rank): exact bytes of the full-depth model's local tensors
  host            the asynchronous checkpoint save's host copy of this rank's state (checkpoint.state_dict)
  step counts     GEMM and attention FLOPs, recompute, eager memory-bound bytes, TP and CP collective bytes
                  (counted over the step: recompute's re-issued collectives included)

The step time is the one roofline model's (`osp.stage2_train.roofline`, pinned device rates: an ESTIMATE),
headline at the config's attention backend with the range across the card's backends. A layout fits when the
peak is at most 90 % of the card (HEADROOM of the dry run) and the host staging of a node's ranks is at most
90 % of `--host-gb` (an assumed host memory per node).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from osp.common.errors import ConfigError, OspError
from osp.stage2_train import roofline as R

GIB = 2**30
HEADROOM = 0.10  # the dry run's: card memory kept free for the runtime context, collective buffers, fragmentation
MODES = ("none", "selective", "full")


class PlanError(ConfigError):
    """A request `osp plan` cannot plan (one line)."""


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    tp: int
    cp: int
    dp: int
    zero1: bool
    checkpointing: str
    micro_batch: int
    grad_accum: int

    @property
    def sp(self) -> bool:
        return self.tp > 1

    def name(self) -> str:
        s = f"TP{self.tp}{'+SP' if self.sp else ''}"
        s += f" CP{self.cp}" if self.cp > 1 else ""
        s += f" DP{self.dp}" + (" ZeRO-1" if self.zero1 else "")
        return f"{s} {self.checkpointing} mb{self.micro_batch}x{self.grad_accum}"

    def overrides(self) -> list[str]:
        """The config keys that select this layout."""
        return [
            f"parallel.tp={self.tp}",
            f"parallel.sp={'true' if self.sp else 'false'}",
            f"parallel.cp={self.cp}",
            f"parallel.zero1={'true' if self.zero1 else 'false'}",
            f"model.checkpointing={self.checkpointing}",
            f"data.batch_size={self.micro_batch}",
            f"optim.grad_accum={self.grad_accum}",
        ]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(dit_cfg, tokens: int, nodes: int, gpus: int, global_batch: int) -> list[Choice]:
    """Every valid layout: TP within a node and dividing the heads, CP x TP dividing the heads and the
    video tokens (osp.stage2_train.layout's own check), DP = world / (TP x CP) dividing the global batch."""
    from osp.stage2_train.layout import check_context_parallel

    heads, world = dit_cfg.num_attention_heads, nodes * gpus
    if global_batch < 1:
        raise PlanError(f"--global-batch {global_batch}: give at least 1 sample per optimizer step")
    out = []
    for tp in _divisors(gpus):
        for cp in _divisors(world // tp):
            if world % (tp * cp) or heads % (tp * cp):
                continue
            try:
                check_context_parallel(heads, tokens, tp, cp, tp > 1)
            except ValueError:
                continue
            dp = world // (tp * cp)
            if global_batch % dp:
                continue
            for zero1 in (False, True) if dp * cp > 1 else (False,):
                for mode in MODES:
                    for mb in _divisors(global_batch // dp):
                        out.append(Choice(tp, cp, dp, zero1, mode, mb, global_batch // dp // mb))
    if not out:
        valid_tp = [t for t in _divisors(gpus) if heads % t == 0]
        raise PlanError(
            f"no layout of {nodes} x {gpus} ranks fits {heads} heads and a global batch of {global_batch}: the "
            f"data-parallel size must divide --global-batch (TP options within a node: {valid_tp}); "
            "raise --global-batch to a multiple of the world size or change --gpus"
        )
    return out


# ------------------------------------------------------------------------------------------------
# measurement: the Trainer on meta at 1 and 2 blocks
# ------------------------------------------------------------------------------------------------
@dataclass
class Counts:
    """One steady optimizer step (batch 1) of one rank under one checkpointing mode."""

    peak_above_held: float = 0.0
    gemm: float = 0.0
    attn_fwd: float = 0.0
    attn_recompute: float = 0.0
    mem: float = 0.0
    tp_coll: float = 0.0  # payload bytes on the TP group (all-reduce counted twice)
    cp_coll: float = 0.0  # payload bytes on the CP group

    def __sub__(self, o: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

    def __add__(self, o: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

    def scaled(self, k: float) -> Counts:
        return Counts(*(a * k for a in dataclasses.astuple(self)))


_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
    "split", "split_with_sizes", "chunk", "unbind", "alias", "as_strided", "detach", "_reshape_alias", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unflatten", "reshape", "flatten",
    "view_as", "expand_as", "zeros", "zeros_like", "ones_like", "full", "scalar_tensor", "_to_copy", "copy_",
}  # fmt: skip
_GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def _step_counter(layout):
    """A dispatch-level counter of one step (GEMM and attention FLOPs, eager memory-bound bytes, collective
    payloads by group), alongside the dry run's PeakMemory."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    tp_name = _group_name(layout.tp_group)
    cp_name = _group_name(layout.cp_group)

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    class StepCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.c = Counts()
            self.forward_done = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            c = self.c
            if func.namespace in ("c10d", "_c10d_functional"):
                group = _pg_name(args)
                if "allgather" in name or "all_gather" in name:
                    b = nbytes(ins[0])
                elif "reduce_scatter" in name:
                    b = nbytes(ins[1]) if len(ins) > 1 else nbytes(ins[0])
                elif "allreduce" in name or "all_reduce" in name:
                    b = 2 * sum(nbytes(t) for t in ins if t.is_floating_point())
                elif "alltoall" in name or "all_to_all" in name:
                    b = nbytes(ins[0])
                else:
                    b = 0
                if group == tp_name:
                    c.tp_coll += b
                elif group == cp_name:
                    c.cp_coll += b
            elif name in _GEMMS:
                a, w = ins[-2], ins[-1]
                c.gemm += 2 * a.numel() * w.shape[-1]
            elif "scaled_dot_product" in name:
                q, k = (ins[1], ins[2]) if "backward" in name else (ins[0], ins[1])
                f = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
                if "backward" not in name:
                    if torch._C._current_graph_task_id() == -1:
                        c.attn_fwd += f
                    else:
                        c.attn_recompute += f  # a forward kernel inside backward: recompute
            elif name not in _VIEWS and outs:
                c.mem += sum(nbytes(t) for t in ins) + sum(nbytes(t) for t in outs)
            return out

    return StepCounter()


def _group_name(group) -> str | None:
    return None if group is None else group.group_name


def _pg_name(args) -> str | None:
    """The group name of a c10d op's ProcessGroup argument (a boxed ScriptObject at the dispatcher)."""
    import torch
    from torch._C._distributed_c10d import ProcessGroup

    for a in args:
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return ProcessGroup.unbox(a).group_name
    return None


@dataclass
class Depth:
    """What one depth measured: bytes of what the rank holds and the per-mode step counts."""

    params: int  # local parameter bytes (fp32)
    host: int  # checkpoint staging bytes at this measurement's DP x CP (for the depth difference only)
    modes: dict[str, Counts] = field(default_factory=dict)


def _measure_depth(
    preset: str, tp: int, cp: int, layers: int, config: str | None, overrides: tuple, batch: int = 1
) -> Depth:
    import torch

    from osp.stage2_train import dryrun as DR
    from osp.stage2_train.plan import apply_ac
    from osp.stage2_train.trainer import build_trainer, model_config

    cfg = DR.build_config(config, list(overrides), preset, tp, tp > 1, "none", cp)
    cfg.run.device, cfg.model.init, cfg.data.num_workers, cfg.run.tensorboard = "meta", "", 0, False
    cfg.data.batch_size, cfg.optim.grad_accum, cfg.parallel.zero1 = batch, 1, True
    parts = dataclasses.replace(
        DR.meta_parts(synthetic=True), dit_config=lambda c: dataclasses.replace(model_config(c), num_layers=layers)
    )
    world = tp * cp * 2  # DP = 2: DDP's buckets and ZeRO-1 as in every planned layout with DP x CP > 1
    trainer = None
    with DR.fake_world(world, 0):
        try:
            trainer = build_trainer(cfg, parts=parts, console=DR._quiet_console())
            with DR.FusedAttention():
                trainer.train_step()  # AdamW state exists from here on
            out = Depth(params=DR.tensor_bytes(trainer.model.parameters()), host=0)
            for mode in MODES:
                apply_ac(trainer.model, mode)
                peak, counter = DR.PeakMemory("meta"), _step_counter(trainer.layout)
                held = DR.held_tensors(trainer)
                peak.track(held)
                base = peak.current
                with DR.FusedAttention(), peak, counter:
                    trainer.train_step()
                counter.c.peak_above_held = peak.peak - base
                out.modes[mode] = counter.c
            del held
            torch.manual_seed(0)
            return out
        finally:
            if trainer is not None:
                trainer.close()


@lru_cache(maxsize=None)
def measure(preset: str, tp: int, cp: int, config: str | None = None, overrides: tuple = ()) -> dict:
    """{(blocks, micro-batch): Depth} at 1 and 2 blocks x micro-batch 1 and 2, of a (TP, CP) on meta."""
    return {(n, b): _measure_depth(preset, tp, cp, n, config, overrides, b) for n in (1, 2) for b in (1, 2)}


def at(m: dict, mode: str, layers: int, batch: int) -> Counts:
    """A step's counts at `layers` blocks and micro-batch `batch`: bilinear in both (every block has the same
    shapes; every per-sample tensor scales with the batch), exact at the four measured points."""
    f = {k: d.modes[mode] for k, d in m.items()}
    dl, db = layers - 1, batch - 1
    cross = f[(2, 2)] - f[(2, 1)] - f[(1, 2)] + f[(1, 1)]
    return f[(1, 1)] + (f[(2, 1)] - f[(1, 1)]).scaled(dl) + (f[(1, 2)] - f[(1, 1)]).scaled(db) + cross.scaled(dl * db)


# ------------------------------------------------------------------------------------------------
# exact held state at full depth
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _local_sizes(cfg_json: str, tp: int) -> tuple[tuple[str, int], ...]:
    from osp.common.models.dit import build_dit
    from osp.stage2_train.state_dict_adapter import tp_split_dim

    model = build_dit(json.loads(cfg_json), device="meta")
    return tuple((n, p.numel() // (tp if tp_split_dim(n) is not None else 1)) for n, p in model.named_parameters())


def zero_partition_max(sizes: list[int], ranks: int) -> int:
    """Elements of the largest ZeRO-1 partition: torch ZeroRedundancyOptimizer's split (parameters by size,
    largest first, each to the rank with the fewest elements so far)."""
    load = [0] * ranks
    for n in sorted(sizes, reverse=True):
        r = min(range(ranks), key=lambda i: (load[i], i))
        load[r] += n
    return max(load)


def ema_owned_max(sizes: list[int], dp: int) -> int:
    from osp.stage2_train.optim import dp_owners

    owners, load = dp_owners(sizes, dp), [0] * dp
    for n, o in zip(sizes, owners):
        load[o] += n
    return max(load)


def get_dit(preset: str):
    from osp.common.models.dit import get_dit_config

    return get_dit_config(preset)


@dataclass
class State:
    params: int
    grads: int
    optimizer: int
    ema: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema


def held_state(dit_cfg, layout: Choice, ema: bool = True) -> State:
    """Bytes a rank of `layout` holds between steps (the largest rank): fp32 parameters, fp32 gradients (DDP
    buckets; without DP x CP the backward creates them: counted whole), AdamW m and v, the EMA."""
    sizes = [n for _, n in _local_sizes(json.dumps(dit_cfg.to_dict()), layout.tp)]
    p = sum(sizes)
    group = layout.dp * layout.cp
    owned = zero_partition_max(sizes, group) if layout.zero1 and group > 1 else p
    return State(
        params=4 * p,
        grads=4 * p,
        optimizer=8 * owned,
        ema=4 * (ema_owned_max(sizes, layout.dp) if ema else 0),
    )


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    layout: Choice
    peak: float  # bytes per rank
    host: float  # bytes per node (checkpoint staging of its ranks)
    fits_device: bool
    fits_host: bool
    step_s: float
    mfu: float
    mfu_low: float
    mfu_high: float
    hfu: float
    backend: str
    samples_per_s: float
    days: float
    gpu_hours: float
    estimate: R.RangeEstimate | None = None

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.name(),
            **dataclasses.asdict(self.layout),
            "mfu_by_backend": {k: e.mfu for k, e in self.estimate.by_backend.items()} if self.estimate else {},
            "overrides": self.layout.overrides(),
            "fits": self.fits,
            "fits_device": self.fits_device,
            "fits_host": self.fits_host,
            "peak_gib": self.peak / GIB,
            "host_gib_per_node": self.host / GIB,
            "step_s": self.step_s,
            "mfu": self.mfu,
            "mfu_range": [self.mfu_low, self.mfu_high],
            "hfu": self.hfu,
            "backend": self.backend,
            "samples_per_s": self.samples_per_s,
            "days": self.days,
            "gpu_hours": self.gpu_hours,
        }


def evaluate(
    dit_cfg,
    tokens: int,
    text_len: int,
    layout: Choice,
    measured: dict,
    card: R.Card,
    *,
    nodes: int,
    gpus: int,
    backend: str,
    samples: float,
    host_gb: float,
    ema: bool = True,
    compiled: bool = False,
) -> Row:
    n, b = dit_cfg.num_layers, layout.micro_batch
    total = at(measured, layout.checkpointing, n, b)  # one micro-step at the preset's depth
    state = held_state(dit_cfg, layout, ema)
    peak = state.total + total.peak_above_held
    # the host copy of a save: parameters, this rank's EMA share and AdamW partition (the checkpoint's pieces)
    host = (state.params + state.ema + state.optimizer) * gpus
    usable = card.memory_gb * 1e9 * (1 - HEADROOM)
    # the block collectives run over the TP x CP ranks of a node: expressed over that group for the roofline
    g = layout.tp * layout.cp
    ring = lambda k: (k - 1) / k if k > 1 else 0.0  # noqa: E731
    coll = (total.tp_coll * ring(layout.tp) + total.cp_coll * ring(layout.cp)) / ring(g) if g > 1 else 0.0
    per_block = R.BlockCounts(  # the step's counts spread over the blocks (the rest of the model included)
        gemm_flops=total.gemm / n,
        attn_fwd_flops=total.attn_fwd / n,
        mem_bytes=total.mem / n,
        coll_bytes=coll / n,
        attn_recompute_flops=total.attn_recompute / n,
    )
    counts = R.StepCounts(
        layers=n,
        block=per_block,
        model_flops=layout.grad_accum * R.model_flops(dit_cfg, tokens, text_len, b, layout.tp, layout.cp),
        params=state.params // 4,
        tp=g,
        dp=layout.dp * layout.cp,
        micro_steps=layout.grad_accum,
        memory="compiled" if compiled else "eager",
        zero1=layout.zero1,
        nodes=nodes,
    )
    rng = R.estimate_range(counts, card, backend)
    h = rng.headline
    global_batch = layout.dp * b * layout.grad_accum
    sps = global_batch / h.step_s
    seconds = samples / sps
    return Row(
        layout=layout,
        peak=peak,
        host=host,
        fits_device=peak <= usable,
        fits_host=host <= host_gb * 1e9 * (1 - HEADROOM),
        step_s=h.step_s,
        mfu=h.mfu,
        mfu_low=rng.low.mfu,
        mfu_high=rng.high.mfu,
        hfu=h.hfu,
        backend=h.backend,
        samples_per_s=sps,
        days=seconds / 86400,
        gpu_hours=seconds / 3600 * nodes * gpus,
        estimate=rng,
    )


@dataclass
class Plan:
    preset: str
    card: str
    nodes: int
    gpus: int
    global_batch: int
    samples: float
    rows: list[Row]
    seconds: float
    host_gb: float

    def ranked(self) -> list[Row]:
        """Fitting layouts first, fastest first; then the others by peak."""
        return sorted(self.rows, key=lambda r: (not r.fits, -r.samples_per_s if r.fits else r.peak))

    def to_json(self) -> str:
        return json.dumps(
            {
                "preset": self.preset,
                "card": self.card,
                "nodes": self.nodes,
                "gpus_per_node": self.gpus,
                "global_batch": self.global_batch,
                "samples": self.samples,
                "host_gb_per_node": self.host_gb,
                "rows": [r.to_dict() for r in self.ranked()],
                "seconds": self.seconds,
            },
            indent=1,
        )

    def table(self, top: int | None = 20) -> str:
        card = R.get_card(self.card)
        rows = self.ranked()
        shown = rows if top is None else rows[:top]
        fitting = sum(r.fits for r in rows)
        lines = [
            f"osp plan: {self.preset} on {self.nodes} x {self.gpus} {card.title}, global batch {self.global_batch}, "
            f"{self.samples:,.0f} samples; {len(rows)} layouts, {fitting} fit "
            f"(peak <= {1 - HEADROOM:.0%} of {card.memory_gb:g} GB, host staging <= {1 - HEADROOM:.0%} of "
            f"{self.host_gb:g} GB per node)",
            "| # | layout | fits | peak GiB | host GiB/node | step s (est.) | MFU (est.) | MFU range | samples/s "
            "| days | GPU-hours |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(shown, 1):
            fits = "yes" if r.fits else ("no (host)" if r.fits_device else "no")
            lines.append(
                f"| {i} | {r.layout.name()} | {fits} | {r.peak / GIB:.1f} | {r.host / GIB:.0f} | {r.step_s:.2f} | "
                f"{100 * r.mfu:.1f} % | {100 * r.mfu_low:.1f}–{100 * r.mfu_high:.1f} % | {r.samples_per_s:.2f} | "
                f"{r.days:.1f} | {r.gpu_hours:,.0f} |"
            )
        if top is not None and len(rows) > top:
            lines.append(f"({len(rows) - top} more: --top 0 or --json for all)")
        h = rows[0]
        lines.append(
            f"estimates at the pinned rates of {card.name} ({h.backend} attention headline, eager memory traffic, "
            f"collectives not overlapped); peak and host from the dry run's counts ({self.seconds:.0f} s)"
        )
        return "\n".join(lines)


def plan(
    preset: str,
    nodes: int,
    gpus: int,
    card: str,
    global_batch: int,
    samples: float = 1e6,
    config: str | None = None,
    overrides: tuple = (),
    host_gb: float = 2048.0,
    tp: int | None = None,
    backend: str | None = None,
    progress=None,
) -> Plan:
    """Every valid layout of `preset` (or `config`'s model) on `nodes` x `gpus` ranks of `card`, evaluated."""
    from osp.stage2_train.dryrun import build_config
    from osp.stage2_train.geometry import video_tokens
    from osp.stage2_train.trainer import model_config
    from osp.common.config import TEXT_MAX_LENGTH

    t0 = time.perf_counter()
    c = R.get_card(card)
    if nodes < 1 or gpus < 1:
        raise PlanError(f"--nodes {nodes} --gpus {gpus}: give at least one node of at least one device")
    base = build_config(config, list(overrides), preset, None, None, None)
    dit_cfg = model_config(base)
    shape = (int(dit_cfg.sample_size_t), int(dit_cfg.sample_size[0]), int(dit_cfg.sample_size[1]))
    tokens = video_tokens(dit_cfg, shape)
    heads = dit_cfg.num_attention_heads
    if tp is not None and (heads % tp or gpus % tp):
        raise PlanError(
            f"--tp {tp} does not divide the {heads} attention heads of {base.model.preset} and the {gpus} devices "
            f"of a node; choose one of {[t for t in _divisors(gpus) if heads % t == 0]}"
        )
    backend = backend or base.model.attention_backend
    R.rate_backend(c, backend)  # refuse a backend the card has no rate for, in one line
    todo = [lay for lay in layouts(dit_cfg, tokens, nodes, gpus, global_batch) if tp is None or lay.tp == tp]
    pairs = sorted({(lay.tp, lay.cp) for lay in todo})
    measured = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (tp, cp) in enumerate(pairs):
            if progress:
                progress(f"measuring TP{tp} CP{cp} on meta ({i + 1}/{len(pairs)})")
            measured[(tp, cp)] = measure(base.model.preset, tp, cp, config, tuple(overrides))
    ema = base.optim.ema_decay > 0
    rows = [
        evaluate(
            dit_cfg,
            tokens,
            TEXT_MAX_LENGTH,
            lay,
            measured[(lay.tp, lay.cp)],
            c,
            nodes=nodes,
            gpus=gpus,
            backend=backend,
            samples=samples,
            host_gb=host_gb,
            ema=ema,
            compiled=False,
        )
        for lay in todo
    ]
    return Plan(base.model.preset, c.name, nodes, gpus, global_batch, samples, rows, time.perf_counter() - t0, host_gb)


def first_fitting(p: Plan) -> Row:
    best = p.ranked()[0]
    if not best.fits:
        raise PlanError(
            f"no layout of {p.preset} fits {p.nodes} x {p.gpus} {p.card}; use more devices or a larger card"
        )
    return best


def main_cli(**kw) -> int:
    """Entry point behind `osp plan` (one-line refusals)."""
    as_json, top = kw.pop("as_json", False), kw.pop("top", 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = plan(**kw, progress=lambda m: sys.stderr.write(m + "\n") if not as_json else None)
    except OspError as e:
        sys.stderr.write(f"error: {str(e).strip().splitlines()[0]}\n")
        return 1
    print(p.to_json() if as_json else p.table(top or None))
    return 0 if any(r.fits for r in p.rows) else 2


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="osp plan")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--card", default="h100-80gb")
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--samples", type=float, default=1e6)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.exit(
        main_cli(
            preset=a.preset,
            nodes=a.nodes,
            gpus=a.gpus,
            card=a.card,
            global_batch=a.global_batch or a.nodes * a.gpus,
            samples=a.samples,
            config=a.config,
            as_json=a.json,
        )
    )
