"""OpenSoraT2V at real width on one H100/H200 in the trainer's regime: forward+backward and full-step
time, analytic model and hardware FLOPs (osp.stage2_train.roofline), model TFLOP/s, MFU (model FLOPs) and HFU
(hardware FLOPs: recompute, flash backward 2.5x) against the card's nominal dense bf16 peak (the measured matmul
rate beside it), and bf16-vs-fp32 output agreement.

The regime is the trainer's: fp32 master weights, every activation in the `--precision`
dtype (model.compute_dtype, no autocast), `--checkpointing none|selective|full`, the
`--attention-backend` switch (the kernel actually used is printed), optional `--compile`. The full step
adds what the trainer does after backward: DP gradient all-reduce (when torchrun gives more ranks than
--tp), the global grad norm + clip, AdamW and the EMA update (stage2_train.optim).

Self-contained: needs only torch and the osp package (megatron-core is optional: with it,
`torchrun --nproc_per_node N bench/gpu/bench_dit_gpu.py --tp T [--sp]` times the megatron TP/SP plan with
DP = N / T, one GPU per rank (LOCAL_RANK); without it only the single-GPU run is available). Runs in a few minutes. The model is the real
OpenSoraT2V definition (D 2304, 24 heads x 96, FFN 9216, text 4096) with --blocks transformer blocks
(default 4) at the 93x480p token count: latent 4 x 24 x 60 x 80 -> 28,800 video tokens, 512 text tokens.

    python bench/gpu/bench_dit_gpu.py                 # single GPU
    python bench/gpu/bench_dit_gpu.py --dry-run       # tiny sizes on CPU (what the test runs)

It prints a markdown block ready to paste into bench/RESULTS.md (with torch.cuda.get_device_name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

# the osp package (installed editable, or run from a checkout without installing)
try:
    from osp.common.models.attention import resolve_backend
    from osp.common.models.dit import DiTConfig, build_dit, resolve_precision
    from osp.stage2_train import roofline as R
except ImportError:  # pragma: no cover - a bare checkout: map the folders to osp.* by hand
    import types

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name, folder in (
        ("osp", None),
        ("osp.common", "common"),
        ("osp.common.models", "common/models"),
        ("osp.stage2_train", "stage2_train"),
    ):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(root, folder)] if folder else []
        sys.modules[name] = mod
    from osp.common.models.attention import resolve_backend
    from osp.common.models.dit import DiTConfig, build_dit, resolve_precision
    from osp.stage2_train import roofline as R

# Nominal dense bf16 peaks (TFLOP/s, no sparsity): the MFU reference. Matched in this order against
# torch.cuda.get_device_name ("NVIDIA GH200 480GB", "NVIDIA H200 NVL", "NVIDIA H200", "NVIDIA H100 80GB HBM3").
# The SXM cards' peaks are the roofline table's; the NVL/PCIe variants (lower clocks) are listed here only.
NOMINAL_BF16_TFLOPS = {
    "GH200": R.CARDS["h200-141gb"].peak_tflops,
    "H200 NVL": 835.0,
    "H200": R.CARDS["h200-141gb"].peak_tflops,
    "H100 SXM": R.CARDS["h100-80gb"].peak_tflops,
    "H100 80GB HBM3": R.CARDS["h100-80gb"].peak_tflops,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": R.CARDS["a100-80gb"].peak_tflops,
}


@dataclass
class Shape:
    blocks: int
    heads: int
    head_dim: int
    text_dim: int
    frames: int
    height: int  # latent
    width: int
    text_len: int
    batch: int

    @property
    def d(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return self.frames * (self.height // 2) * (self.width // 2)


def dit_config(s: Shape) -> DiTConfig:
    return DiTConfig(
        num_layers=s.blocks,
        num_attention_heads=s.heads,
        attention_head_dim=s.head_dim,
        caption_channels=s.text_dim,
        cross_attention_dim=s.d,
        sample_size=[s.height, s.width],
        sample_size_t=s.frames,
    )


def model_flops(s: Shape, tp: int = 1, checkpointing: str = "none") -> dict[str, float]:
    """FLOPs of one forward + backward of the batch on one TP rank (osp.stage2_train.roofline): model FLOPs
    (3x forward, no recompute) and hardware FLOPs (recompute, flash attention's 2.5x backward)."""
    cfg = dit_config(s)
    f = R.forward_flops(cfg, s.tokens, s.text_len, s.batch, tp=tp)
    return {
        "forward": f.total,
        "train": R.model_flops(cfg, s.tokens, s.text_len, s.batch, tp=tp),
        "hardware": R.hardware_flops(cfg, s.tokens, s.text_len, s.batch, tp=tp, checkpointing=checkpointing),
        "attention_share": f.attention / f.total,
    }


def attention_kernels(fn) -> str:
    """The aten attention kernels one call of `fn` dispatches (profiled: what a compiled model runs, too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for e in prof.events():
        n = e.name.removeprefix("aten::")
        if n.startswith(("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")):
            if "backward" not in n and n not in names:
                names.append(n)
    return ", ".join(names) if names else "math (no fused attention kernel)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(dev: torch.device, n: int, iters: int) -> float:
    """Measured bf16 matmul TFLOP/s at n x n x n."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    reps = 10 if dev.type == "cuda" else 1

    def f():
        for _ in range(reps):
            torch.mm(a, b)

    return 2 * n**3 * reps / timed(f, dev, iters, 2) / 1e12


def make_inputs(s: Shape, dev: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(s.batch, 4, s.frames, s.height, s.width, generator=g).to(dev)
    t = torch.linspace(100, 900, s.batch).to(dev)
    text = torch.randn(s.batch, s.text_len, s.text_dim, generator=g).to(dev)
    mask = torch.ones(s.batch, s.text_len, device=dev)
    mask[:, (3 * s.text_len) // 4 :] = 0  # some padding, so the masked (efficient) kernel path is exercised
    return x, t, text, mask


def init_parallel(args) -> tuple[int, int, int]:
    """torchrun ranks: megatron TP(/SP) of --tp ranks, DP over the rest, one device per rank (LOCAL_RANK).
    Returns (tp, rank, local_rank); a single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and args.tp == 1:
        return 1, 0, local
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the torchrun world size (WORLD_SIZE={world})")
    try:
        from megatron.core import parallel_state
    except ImportError:
        raise SystemExit(
            "torchrun ranks need megatron-core (pip install megatron-core==0.16.1); run one process for one GPU"
        ) from None
    import torch.distributed as dist

    backend = "gloo" if args.dry_run or not torch.cuda.is_available() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    from osp.common import megatron_cpu

    megatron_cpu.apply()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    return args.tp, dist.get_rank(), local


def run(args) -> dict:
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run for the CPU smoke test")
    if args.dry_run:
        s = Shape(blocks=2, heads=2, head_dim=24, text_dim=64, frames=3, height=8, width=8, text_len=8, batch=1)
        args.iters, args.warmup, peak_n = 2, 1, 128
    else:
        s = Shape(args.blocks, 24, 96, 4096, args.frames, args.height, args.width, args.text_len, args.batch)
        peak_n = 8192
    tp, rank, local = init_parallel(args)
    dev = torch.device("cpu") if args.dry_run else torch.device("cuda", local)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference must be true fp32
    torch.backends.cudnn.allow_tf32 = False

    cfg = dit_config(s)
    torch.manual_seed(0)
    model = build_dit(cfg, device=dev)  # fp32 master weights, as the trainer
    with torch.no_grad():  # non-zero modulation tables and output layer (zero-init would hide numerics)
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    x, t, text, mask = make_inputs(s, dev)
    act = resolve_precision(args.precision, dev.type != "cpu")

    # bf16 vs fp32 activations of the same fp32 weights (forward, no grad)
    with torch.no_grad():
        model.compute_dtype = torch.float32
        ref = model(x, t, text, mask).float()
        model.compute_dtype = torch.bfloat16
        out = model(x, t, text, mask).float()
    rel_max = float((out - ref).abs().max() / ref.abs().max())
    rel_rms = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    del ref, out

    from osp.stage2_train.dist import current_layout
    from osp.stage2_train.layout import Layout
    from osp.stage2_train.parallel import parallelize, reduce_sequence_parallel_grads
    from osp.stage2_train.plan import apply_ac, apply_compile

    layout = current_layout(args.sp) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Layout()  # one GPU: no groups
    if tp > 1:
        model = parallelize(model, layout)
    model.compute_dtype = act
    apply_ac(model, args.checkpointing)
    resolve_backend(args.attention_backend, dev, s.heads // tp, s.head_dim, act)
    if args.compile:
        apply_compile(model)
    grad = torch.randn(s.batch, 4, s.frames, s.height, s.width, device=dev, dtype=act)

    # the rest of a trainer step, with the trainer's parts: DP reduction (torch DDP, overlapped with
    # backward), SP grads over TP, global norm + clip, AdamW, EMA
    from osp.stage2_train.state_dict_adapter import tp_split_dim
    from osp.stage2_train.data_parallel import DataParallel, ShardedAdamW
    from osp.stage2_train.optim import EMA, clip_grads, global_grad_norm

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params, sharded = [p for _, p in named], [tp_split_dim(n) is not None for n, _ in named]
    dp = layout.dp
    ddp = DataParallel(model, layout, device_ids=[dev.index] if dev.type == "cuda" else None)
    optim = ShardedAdamW(
        params,
        [n for n, _ in named],
        layout.dp_cp_group,
        shard=False,
        keep_grads=ddp.ddp is not None,
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
    )
    ema = EMA(model, 0.999)

    def fwd_bwd():
        ddp.module(x, t, text, mask).backward(grad)  # DP reduction (if any) runs inside this backward
        if tp > 1:
            reduce_sequence_parallel_grads(model)

    def after_backward():
        norm = global_grad_norm(params, sharded, layout)
        clip_grads(params, norm, 1.0)
        optim.step()
        ema.update(model)

    def full_step():
        optim.zero_grad()
        fwd_bwd()
        after_backward()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # the kernel the (compiled, when --compile) model dispatches, seen in one warm-up forward
    with torch.no_grad():
        kernel = attention_kernels(lambda: model(x, t, text, mask))
    secs = timed(lambda: (optim.zero_grad(), fwd_bwd()), dev, args.iters, args.warmup)
    step_secs = timed(full_step, dev, args.iters, 1)
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    with torch.no_grad():
        fwd_secs = timed(lambda: model(x, t, text, mask), dev, args.iters, args.warmup)
    peak = matmul_peak(dev, peak_n, args.iters)

    fl = model_flops(s, tp, args.checkpointing)  # per rank
    tflops = fl["train"] / secs / 1e12  # model TFLOP/s per GPU
    step_tflops = fl["train"] / step_secs / 1e12
    hw_tflops = fl["hardware"] / secs / 1e12
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    return {
        "card": name,
        "torch": torch.__version__,
        "shape": s.__dict__,
        "tokens": s.tokens,
        "tp": tp,
        "dp": dp,
        "sp": bool(args.sp and tp > 1),
        "precision": str(act).removeprefix("torch."),
        "checkpointing": args.checkpointing,
        "attention_kernel": kernel,
        "compile": bool(args.compile),
        "fwd_bwd_ms": secs * 1e3,
        "step_ms": step_secs * 1e3,
        "fwd_ms": fwd_secs * 1e3,
        "fwd_bwd_ms_per_block": secs * 1e3 / s.blocks,
        "train_tflop": fl["train"] / 1e12,
        "hardware_tflop": fl["hardware"] / 1e12,
        "attention_flop_share": fl["attention_share"],
        "tflops_per_gpu": tflops,
        "step_tflops_per_gpu": step_tflops,
        "matmul_peak_tflops": peak,
        "nominal_peak_tflops": nominal,
        "mfu_nominal": (tflops / nominal) if nominal else None,
        "hfu_nominal": (hw_tflops / nominal) if nominal else None,
        "step_mfu_nominal": (step_tflops / nominal) if nominal else None,
        "mfu_measured_peak": tflops / peak,
        "peak_mem_gib": peak_mem,
        "bf16_vs_fp32": {"rel_max": rel_max, "rel_rms": rel_rms, "cosine": cos},
        "rank": rank,
    }


def markdown(r: dict) -> str:
    s = r["shape"]
    setting = (
        f"{s['blocks']} blocks D{s['heads'] * s['head_dim']} ({s['heads']}x{s['head_dim']}), "
        f"{r['tokens']} video + {s['text_len']} text tokens, B{s['batch']}, {r['precision']} activations (fp32 masters)"
        f"{', TP=%d' % r['tp'] if r['tp'] > 1 else ''}{'+SP' if r['sp'] else ''}, DP={r['dp']}, "
        f"checkpointing {r['checkpointing']}, {r['attention_kernel']}{', compiled' if r['compile'] else ''}"
    )
    pct = lambda v: f"{v:.1%}" if v is not None else "n/a (card not in NOMINAL_BF16_TFLOPS)"  # noqa: E731
    b = r["bf16_vs_fp32"]
    lines = [
        f"<!-- bench/gpu/bench_dit_gpu.py, torch {r['torch']} -->",
        "| card | setting | fwd+bwd ms (per block) | full step ms | fwd ms | model TFLOP/s per GPU (fwd+bwd / step) | MFU vs nominal peak (fwd+bwd / step) | HFU (fwd+bwd) | measured matmul TFLOP/s | peak mem GiB | bf16 vs fp32 (max rel / rms rel / cos) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['card']} | {setting} | {r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_ms_per_block']:.1f}) | {r['step_ms']:.1f} | {r['fwd_ms']:.1f} | "
        f"{r['tflops_per_gpu']:.1f} / {r['step_tflops_per_gpu']:.1f} | {pct(r['mfu_nominal'])} / {pct(r['step_mfu_nominal'])} | {pct(r['hfu_nominal'])} | "
        f"{r['matmul_peak_tflops']:.1f} | {r['peak_mem_gib']:.1f} | {b['rel_max']:.2e} / {b['rel_rms']:.2e} / {b['cosine']:.6f} |",
        "",
        f"FLOPs per GPU per fwd+bwd: model {r['train_tflop']:.2f} TFLOP (3x forward incl. attention, no recompute: MFU), "
        f"hardware {r['hardware_tflop']:.2f} TFLOP (recompute, flash backward 2.5x: HFU); attention share "
        f"{r['attention_flop_share']:.1%}. Nominal peak: {r['nominal_peak_tflops']} TFLOP/s dense bf16.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (smoke test)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--frames", type=int, default=24, help="latent frames (93 px frames -> 24)")
    p.add_argument("--height", type=int, default=60, help="latent height (480 px -> 60)")
    p.add_argument("--width", type=int, default=80, help="latent width (640 px -> 80)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--checkpointing", default="selective", choices=["none", "selective", "full"], help="as model.checkpointing"
    )
    p.add_argument("--precision", default="bf16", choices=["auto", "bf16", "fp32"], help="as run.precision")
    p.add_argument("--attention-backend", default="auto", help="as model.attention_backend")
    p.add_argument("--compile", action="store_true", help="as model.compile (torch.compile each block)")
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size (torchrun --nproc_per_node TP; needs megatron-core)"
    )
    p.add_argument("--sp", action="store_true", help="sequence parallelism with --tp > 1")
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    r = run(args)
    if r["rank"] == 0:
        print(markdown(r))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
