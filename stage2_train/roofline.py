"""The one roofline model of a training step: a pinned device table, the DiT's FLOPs, a step-time estimate.

Every time or MFU osp derives without a device comes from here. The rates are pinned per card and never
tuned to reach a target; a figure measured on a real card replaces the estimate (with the card's name).

Conventions
* Model FLOPs: forward GEMMs + attention (QK^T and PV: 4 S_q S_kv D per attention and sample, forward),
  x 3 for forward + backward, no recompute. MFU = model FLOPs / (step time x nominal dense bf16 peak).
* Hardware FLOPs: what the kernels execute: + activation recompute, + flash attention's backward, which
  recomputes the scores (backward = 2.5 x forward attention FLOPs). HFU uses these.
* Attention time: forward FLOPs / forward rate + 2.5 x forward FLOPs / backward rate (rates in that convention).
* Memory-bound bytes: eager per-op traffic unless a compiled run's traffic was counted; the caller says which.
* Collectives are exposed (not overlapped); ring all-gather / reduce-scatter time = bytes (n-1)/n / bus bandwidth
  (an all-reduce is a reduce-scatter + an all-gather: its payload counts twice).
* Per-rank FLOPs count the layers every rank runs whole (embeddings, caption projection, final layer) on every
  rank; the blocks' FLOPs are split over TP (heads) and CP (video tokens).

No torch import: the estimate runs inside `osp plan` sweeps and the dry run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from osp.common.errors import ConfigError

FLASH_BACKWARD = 2.5  # flash attention's backward in forward-attention FLOPs (scores recomputed)
TIMESTEP_CHANNELS = 256  # sinusoid width of the timestep embedding (osp.common.models.dit)
ADAM_BYTES = 28  # AdamW per fp32 parameter: read p, g, m, v; write p, m, v
EMA_NORM_BYTES = 16  # EMA read/write + parameter read (12), grad-norm read (4)


# ------------------------------------------------------------------------------------------------
# the pinned device table
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Card:
    """One accelerator. Rates in TFLOP/s, TB/s and GB/s; attention rates per backend as (forward, backward)
    with the backward in the 2.5x flash convention. `assumptions` names the fields that are derived, not
    published or pinned from a measurement."""

    name: str
    title: str
    peak_tflops: float  # nominal dense bf16 (no sparsity): the MFU reference
    gemm_tflops: float  # large bf16 GEMMs
    attention: dict[str, tuple[float, float]]
    default_backend: str  # what `model.attention_backend = "auto"` runs on this card
    hbm_tbps: float
    link_gbps: float  # intra-node bus bandwidth per device (NCCL/HCCL ring)
    internode_gbps: float  # inter-node bandwidth per device
    memory_gb: float  # device memory, GB (1e9 bytes) as the vendor counts it
    devices_per_node: int = 8
    assumptions: tuple[str, ...] = field(default=())


def _ascend_910b() -> Card:
    # Public: ~320 TFLOP/s fp16/bf16 cube peak (the figure varies by bin), 64 GB HBM2e at ~1.6 TB/s,
    # HCCS 392 GB/s aggregate per chip, 200 Gb/s RoCE per NPU. Achieved rates are derived from the H100's
    # achieved fractions of its peak (GEMM 600/989, fused attention = cuDNN 500/989 and 400/989).
    peak = 320.0
    h = _H100
    frac = lambda r: round(peak * r / h.peak_tflops, 1)  # noqa: E731
    fwd, bwd = h.attention["cudnn"]
    return Card(
        name="ascend-910b-64gb",
        title="Ascend 910B 64 GB",
        peak_tflops=peak,
        gemm_tflops=frac(h.gemm_tflops),
        attention={"npu": (frac(fwd), frac(bwd))},
        default_backend="npu",
        hbm_tbps=1.6,
        link_gbps=196.0,
        internode_gbps=25.0,
        memory_gb=64.0,
        assumptions=("peak_tflops", "gemm_tflops", "attention", "hbm_tbps", "link_gbps", "internode_gbps"),
    )


_H100 = Card(
    name="h100-80gb",
    title="H100 SXM 80 GB",
    peak_tflops=989.0,
    gemm_tflops=600.0,
    attention={"fa2": (350.0, 280.0), "cudnn": (500.0, 400.0), "fa3": (570.0, 470.0)},
    default_backend="cudnn",
    hbm_tbps=2.6,
    link_gbps=330.0,
    internode_gbps=40.0,  # 8 x 400 Gb/s InfiniBand per node
    memory_gb=80.0,
)

CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        _H100,
        Card(  # same compute as the H100 SXM, more and faster HBM
            name="h200-141gb",
            title="H200 SXM 141 GB",
            peak_tflops=989.0,
            gemm_tflops=600.0,
            attention=dict(_H100.attention),
            default_backend="cudnn",
            hbm_tbps=4.0,
            link_gbps=330.0,
            internode_gbps=40.0,
            memory_gb=141.0,
            assumptions=("link_gbps", "internode_gbps"),  # taken equal to the H100 SXM's (same NVLink 4)
        ),
        Card(
            name="a100-80gb",
            title="A100 SXM 80 GB",
            peak_tflops=312.0,
            gemm_tflops=230.0,
            attention={"fa2": (180.0, 150.0)},  # FlashAttention-3 is Hopper-only
            default_backend="fa2",
            hbm_tbps=1.6,
            link_gbps=200.0,
            internode_gbps=25.0,  # 8 x 200 Gb/s HDR InfiniBand per node
            memory_gb=80.0,
            assumptions=("internode_gbps",),
        ),
        _ascend_910b(),
    )
}

# model.attention_backend -> the rate key (None = the card's default)
_CONFIG_BACKEND = {"auto": None, "cudnn": "cudnn", "flash": "fa2", "fa3": "fa3", "npu": "npu", "fa2": "fa2"}


def get_card(name: str) -> Card:
    try:
        return CARDS[name]
    except KeyError:
        raise ConfigError(f"unknown card {name!r}; known cards: {', '.join(CARDS)}") from None


def rate_backend(card: Card, backend: str) -> str:
    """The attention-rate key of `model.attention_backend = backend` on `card` (auto: the card's default)."""
    key = _CONFIG_BACKEND.get(backend, backend)
    key = card.default_backend if key is None else key
    if key not in card.attention:
        names = {"fa2": "flash"}  # rate key -> model.attention_backend value where they differ
        have = ", ".join(names.get(k, k) for k in card.attention)
        raise ConfigError(
            f"no attention rate for model.attention_backend = {backend!r} on {card.name}; choose auto or one of {have}"
        )
    return key


# ------------------------------------------------------------------------------------------------
# FLOPs of the DiT (2 per multiply-add)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForwardFlops:
    """One forward of `batch` samples on one rank."""

    gemm: float  # every GEMM (blocks + embeddings + final layer)
    attention: float  # QK^T and PV of the self- and cross-attentions
    block_gemm: float  # the blocks' GEMMs (what full recompute runs again)

    @property
    def total(self) -> float:
        return self.gemm + self.attention


def forward_flops(cfg, tokens: int, text_len: int, batch: int = 1, tp: int = 1, cp: int = 1) -> ForwardFlops:
    """Forward FLOPs of the DiT (`cfg`: a DiTConfig) on one rank of a TP x CP layout: N video tokens, L text
    tokens per sample. TP splits the blocks' heads (both attentions' projections, the feed-forward); CP splits
    the video tokens (the text's k/v projections run on every CP rank); the embeddings, caption projection and
    final layer run whole on every rank."""
    d, n, l = cfg.inner_dim, tokens, text_len
    patch_in = cfg.in_channels * cfg.patch_size**2 * cfg.patch_size_t
    patch_out = cfg.out_channels * cfg.patch_size**2 * cfg.patch_size_t
    video_gemm = 2 * n * d * (4 * d + 2 * d + 8 * d)  # self q, k, v, out; cross q, out; feed-forward D -> 4D -> D
    text_gemm = 2 * l * d * 2 * d  # cross k, v on the text
    attention = 4 * n * n * d + 4 * n * l * d  # self-attention; cross-attention over the text
    block_gemm = cfg.num_layers * (video_gemm / (tp * cp) + text_gemm / tp)
    outer = (
        2 * n * patch_in * d  # patch embedding
        + 2 * l * (cfg.caption_channels * d + d * d)  # caption projection
        + 2 * (TIMESTEP_CHANNELS * d + d * d + 6 * d * d)  # timestep embedding + adaLN-single
        + 2 * n * d * patch_out  # final projection
    )
    return ForwardFlops(
        gemm=float(batch * (block_gemm + outer)),
        attention=float(batch * cfg.num_layers * attention / (tp * cp)),
        block_gemm=float(batch * block_gemm),
    )


def model_flops(cfg, tokens: int, text_len: int, batch: int = 1, tp: int = 1, cp: int = 1) -> float:
    """Model FLOPs of one forward + backward on one rank: 3 x forward, no recompute (the MFU numerator)."""
    return 3.0 * forward_flops(cfg, tokens, text_len, batch, tp, cp).total


def recompute_flops(f: ForwardFlops, checkpointing: str) -> tuple[float, float]:
    """(GEMM, attention-forward) FLOPs that activation checkpointing runs again. Selective keeps the GEMM and
    attention outputs (it recomputes only elementwise ops); full re-runs each block's forward."""
    if checkpointing in ("none", "selective"):
        return 0.0, 0.0
    if checkpointing == "full":
        return f.block_gemm, f.attention
    raise ConfigError(f"model.checkpointing = {checkpointing!r} is unknown; choose none, selective or full")


def hardware_flops(
    cfg,
    tokens: int,
    text_len: int,
    batch: int = 1,
    tp: int = 1,
    cp: int = 1,
    checkpointing: str = "none",
    flash: bool = True,
) -> float:
    """FLOPs the kernels execute for one forward + backward on one rank: recompute included; with `flash` the
    attention backward is 2.5 x its forward (scores recomputed), else 2 x (the math kernel)."""
    f = forward_flops(cfg, tokens, text_len, batch, tp, cp)
    gemm_re, attn_re = recompute_flops(f, checkpointing)
    bwd = FLASH_BACKWARD if flash else 2.0
    return 3.0 * f.gemm + (1.0 + bwd) * f.attention + gemm_re + attn_re


# ------------------------------------------------------------------------------------------------
# step-time estimate
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockCounts:
    """One transformer block on one rank, one micro-batch, forward + backward, as counted (e.g. on fake tensors
    by the dry run or bench/step_proxies.py)."""

    gemm_flops: float  # every GEMM, recompute included
    attn_fwd_flops: float  # the attention forward of one pass (the backward is 2.5x this)
    mem_bytes: float  # memory-bound traffic (eager per op unless counted from compiled code)
    coll_bytes: float  # collective payload over the TP group (all-reduce payloads counted twice)
    attn_recompute_flops: float = 0.0  # attention forwards run again by recompute


@dataclass(frozen=True)
class StepCounts:
    """One optimizer step on one rank."""

    layers: int
    block: BlockCounts
    model_flops: float  # per rank per optimizer step (all micro-steps)
    params: int  # parameters on this rank (fp32 masters)
    tp: int = 1  # the group of the block collectives
    dp: int = 1  # the gradient all-reduce group (DP x CP)
    micro_steps: int = 1  # gradient accumulation
    memory: str = "eager"  # eager | compiled: where block.mem_bytes came from
    zero1: bool = False  # AdamW state sharded over dp (+ a parameter broadcast)
    grad_bytes: int = 4  # bytes per gradient element in the all-reduce
    nodes: int = 1  # > 1: the gradient all-reduce crosses nodes


@dataclass(frozen=True)
class Estimate:
    card: str
    backend: str  # the attention-rate key
    memory: str
    step_s: float
    parts_s: dict[str, float]  # gemm, attention_fwd, attention_bwd, memory, collectives, dp_allreduce, optimizer
    model_flops: float
    hardware_flops: float
    peak_tflops: float

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.peak_tflops * 1e12)

    @property
    def hfu(self) -> float:
        return self.hardware_flops / (self.step_s * self.peak_tflops * 1e12)


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def estimate_step(counts: StepCounts, card: Card | str, backend: str = "auto") -> Estimate:
    """Step time on `card` with the attention of `backend` (a model.attention_backend value or a rate key):
    blocks (GEMMs, attention, memory-bound traffic, exposed TP collectives) x layers x micro-steps, then the
    gradient all-reduce, AdamW, EMA and grad norm. Nothing is assumed to overlap."""
    card = get_card(card) if isinstance(card, str) else card
    key = rate_backend(card, backend)
    fwd_rate, bwd_rate = card.attention[key]
    b, reps = counts.block, counts.layers * counts.micro_steps
    link = card.link_gbps if counts.tp <= card.devices_per_node else card.internode_gbps
    dp_link = card.internode_gbps if counts.nodes > 1 else card.link_gbps
    attn_fwd = b.attn_fwd_flops + b.attn_recompute_flops
    grads = counts.params * counts.grad_bytes
    adam_params = counts.params / counts.dp if counts.zero1 else counts.params
    parts = {
        "gemm": reps * b.gemm_flops / (card.gemm_tflops * 1e12),
        "attention_fwd": reps * attn_fwd / (fwd_rate * 1e12),
        "attention_bwd": reps * FLASH_BACKWARD * b.attn_fwd_flops / (bwd_rate * 1e12),
        "memory": reps * b.mem_bytes / (card.hbm_tbps * 1e12),
        "collectives": reps * b.coll_bytes * _ring(counts.tp) / (link * 1e9),
        "dp_allreduce": 2 * _ring(counts.dp) * grads / (dp_link * 1e9)
        + (_ring(counts.dp) * counts.params * 4 / (dp_link * 1e9) if counts.zero1 else 0.0),
        "optimizer": (adam_params * ADAM_BYTES + counts.params * EMA_NORM_BYTES) / (card.hbm_tbps * 1e12),
    }
    hw = reps * (b.gemm_flops + attn_fwd + FLASH_BACKWARD * b.attn_fwd_flops)
    return Estimate(
        card=card.name,
        backend=key,
        memory=counts.memory,
        step_s=sum(parts.values()),
        parts_s=parts,
        model_flops=counts.model_flops,
        hardware_flops=hw,
        peak_tflops=card.peak_tflops,
    )


@dataclass(frozen=True)
class RangeEstimate:
    headline: Estimate  # the config's own backend
    by_backend: dict[str, Estimate]  # every attention backend the card has a rate for

    @property
    def low(self) -> Estimate:
        return min(self.by_backend.values(), key=lambda e: e.mfu)

    @property
    def high(self) -> Estimate:
        return max(self.by_backend.values(), key=lambda e: e.mfu)


def estimate_range(counts: StepCounts, card: Card | str, backend: str = "auto") -> RangeEstimate:
    """The estimate at the config's backend (headline) and at every backend of the card (the range)."""
    card = get_card(card) if isinstance(card, str) else card
    by = {k: estimate_step(counts, card, k) for k in card.attention}
    return RangeEstimate(headline=by[rate_backend(card, backend)], by_backend=by)


def headline_line(r: RangeEstimate, what: str) -> str:
    """`roofline MFU estimate (<what>, <backend>, eager|compiled): NN.N % (range AA.A–BB.B %)`."""
    h = r.headline
    return (
        f"roofline MFU estimate ({what}, {h.backend}, {h.memory}): {100 * h.mfu:.1f} % "
        f"(range {100 * r.low.mfu:.1f}–{100 * r.high.mfu:.1f} %)"
    )
