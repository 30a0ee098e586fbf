"""Exposed time of the data-parallel gradient reduction, with and without overlap, on a 2-process CPU
(gloo) run of the trainer's DP path (stage2_train/data_parallel.py: torch DDP + the bucket hook).

Three modes timed in the same run, interleaved step by step (so machine load hits them alike):
    compute   forward + backward, no reduction (every micro-step under no_sync)
    blocking  + the bucketed all-reduce, each bucket waited for inside backward (overlap_grad_reduce=false)
    overlap   + the bucketed all-reduce launched as buckets fill and waited for at the end of backward
exposed = median step time - median compute time; the figure of merit is exposed(overlap) /
exposed(blocking). A DiT of the real architecture, narrowed so that one step's compute and its
reduction are of the same order on two CPU cores. Wall-clock on a shared CPU: noisy; compare only the
ratio, measured in the same run.

Usage: python bench/dp_overlap.py [--steps 12] [--layers 6] [--dim 288] [--bucket-mb 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from train_helpers import free_port  # noqa: E402

MODES = ("compute", "blocking", "overlap")


def worker(rank: int, port: int, a: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from osp.common.models.dit import build_dit, get_dit_config
    from osp.stage2_train.data_parallel import DataParallel
    from osp.stage2_train.layout import Layout

    cfg = get_dit_config("tiny")
    cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim = a.layers, a.dim // 48, 48
    cfg.cross_attention_dim = a.dim
    torch.manual_seed(0)
    nets = {}
    for mode in MODES:
        torch.manual_seed(0)
        m = build_dit(cfg)
        layout = Layout(rank=rank, world=2, dp=2, dp_rank=rank, dp_group=dist.group.WORLD, dp_cp_group=dist.group.WORLD)
        nets[mode] = DataParallel(m, layout, overlap=mode != "blocking", bucket_mb=a.bucket_mb)
    n_params = sum(p.numel() for p in nets["compute"].model.parameters())
    g = torch.Generator().manual_seed(rank)
    t_, h_, w_ = cfg.sample_size_t, *cfg.sample_size
    x = torch.randn(a.batch, cfg.in_channels, t_, h_ * a.grid, w_ * a.grid, generator=g)
    t = torch.rand(a.batch, generator=g) * 999
    text = torch.randn(a.batch, 16, cfg.caption_channels, generator=g)
    mask = torch.ones(a.batch, 16)

    times = {m: [] for m in MODES}
    for it in range(a.warmup + a.steps):
        for mode in MODES:
            dp = nets[mode]
            dist.barrier()
            t0 = time.perf_counter()
            with dp.sync(final=mode != "compute"):
                dp.module(x, t, text, mask).float().pow(2).mean().backward()  # returns once every bucket is reduced
            dt = time.perf_counter() - t0
            dp.model.zero_grad(set_to_none=False)
            if it >= a.warmup:
                times[mode].append(dt)

    # the same bytes in one stand-alone all-reduce (the reduction's cost with nothing to overlap)
    flat = torch.zeros(n_params)
    alone = []
    for it in range(a.warmup + a.steps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        if it >= a.warmup:
            alone.append(time.perf_counter() - t0)
    buckets = nets["overlap"].hook.buckets // (a.warmup + a.steps)
    med = {m: statistics.median(v) for m, v in times.items()}
    every = [None, None]
    dist.all_gather_object(every, med)
    if rank == 0:
        med = {m: max(e[m] for e in every) for m in MODES}  # a step ends when the slower rank ends
        exp_b, exp_o = med["blocking"] - med["compute"], med["overlap"] - med["compute"]
        print(
            f"DiT {cfg.num_layers} blocks x D {cfg.inner_dim}: {n_params / 1e6:.2f} M params, "
            f"{n_params * 4 / 2**20:.1f} MiB fp32 grads all-reduced per step per rank in ~{buckets} buckets "
            f"of {a.bucket_mb} MiB; 2 gloo processes, {a.steps} timed steps (median)"
        )
        print("| mode | step ms | exposed DP ms |\n|---|---|---|")
        for m, e in (("compute (no reduction)", None), ("blocking", exp_b), ("overlap", exp_o)):
            key = m.split()[0]
            print(f"| {m} | {med[key] * 1e3:.1f} | {'-' if e is None else f'{e * 1e3:.1f}'} |")
        print(f"stand-alone all-reduce of the same bytes: {statistics.median(alone) * 1e3:.1f} ms")
        ratio = exp_o / exp_b if exp_b > 0 else float("nan")
        print(f"exposed DP time, overlap / blocking: {ratio:.2f} (measured, same run)")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=288, help="inner dim, a multiple of 48 (heads of 48)")
    ap.add_argument("--grid", type=int, default=1, help="latent H, W multiplier of the tiny preset's")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    a = ap.parse_args()
    mp.spawn(worker, args=(free_port(), a), nprocs=2, join=True)


if __name__ == "__main__":
    main()
