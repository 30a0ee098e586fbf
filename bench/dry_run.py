"""Per-rank memory and step FLOPs of real layouts, measured by `osp train --dry-run` (meta tensors, fake
process group), with ratios against the TP=1 layout of the same preset measured in the same run.

    python bench/dry_run.py [--preset osp12-93x480p] [--card-gb 80]

Figures are counts of the real model code at real size (bytes of tensors, FLOPs of the executed ops),
not timings; gradients as DDP's buckets hold them; activations in the accelerator regime (run.precision auto = bf16; fp32 parameters and optimizer state).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from osp.stage2_train import dryrun as DR

GIB = 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="osp12-93x480p")
    p.add_argument("--card-gb", type=float, default=80.0)
    args = p.parse_args(argv)
    layouts = [
        (1, False, "none"),
        (1, False, "selective"),
        (1, False, "full"),
        (2, True, "none"),
        (2, True, "selective"),
        (2, True, "full"),
        (4, True, "full"),
    ]
    rows, base = [], None
    for tp, sp, ck in layouts:
        cfg = DR.build_config(None, ["parallel.zero1=true"], args.preset, tp, sp, ck)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = DR.dry_run(cfg, 8, 0, args.card_gb)
        base = base or r
        rows.append((tp, sp, ck, r))
    print(f"{args.preset}, world 8, ZeRO-1, batch 1, rank 0; ratios against TP=1 without checkpointing (same run)")
    print(
        "| TP | SP | checkpointing | params GiB | grads GiB (DDP buckets) | optim GiB | EMA GiB | saved act. GiB | peak GiB "
        "| peak ratio | host staging GiB | model TFLOP | hardware TFLOP (formula / counted) | FLOP ratio (hardware) | fits "
        f"{args.card_gb:g} GiB | dry run s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tp, sp, ck, r in rows:
        print(
            f"| {tp} | {'yes' if sp else 'no'} | {ck} | {r.params / GIB:.2f} | {r.grads / GIB:.2f} | {r.optimizer / GIB:.2f} | "
            f"{r.ema / GIB:.2f} | {r.activations[ck] / GIB:.2f} | {r.peak / GIB:.2f} | {r.peak / base.peak:.3f} | "
            f"{r.host_staging / GIB:.2f} | {r.model_flops / 1e12:,.1f} | {r.hardware_flops / 1e12:,.1f} / "
            f"{r.step_flops / 1e12:,.1f} | {r.step_flops / base.step_flops:.3f} | {'yes' if r.fits else 'no'} | {r.seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
