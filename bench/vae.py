"""CausalVAE bench: peak memory and time of tiled vs untiled decode, and encode throughput.

Memory is the peak resident set size of a fresh subprocess per variant, measured from the moment the
model and the input exist and the libraries are initialised (the kernel's peak-RSS counter VmHWM is
reset via /proc/self/clear_refs, then read after the call). torch's CPU tensors are plain malloc; the
children run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS at once and the peak is
that of live memory, not of glibc's retained heap.

Decode geometry: 93 x 480 x 640 pixels (24 x 60 x 80 latents) with the sampling tiles (512 px /
64 latent px, 29 frames / 8 latents, overlap 0.125) gives 4 temporal chunks x 2 x 2 spatial tiles.
That size does not fit this machine untiled, so the bench runs the same tile counts scaled down in
space by --scale (93 x 480/s x 640/s pixels, tiles 512/s px): the tiled/untiled peak ratio depends on
the tile counts and proportions, not the absolute size. The tiny preset (osp12 at 1/8 width) is used
for decode; encode throughput is reported for tiny and for the real-width osp12.

    .venv/bin/python bench/vae.py            # 93 x 120 x 160, about 2-4 min on 2 cores
    .venv/bin/python bench/vae.py --scale 8  # 93 x 60 x 80, about 1-2 min (fixed costs blur the ratio)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(args) -> dict:
    import torch

    from osp.common.config import TileConfig
    from osp.common.models.vae import build_vae

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_vae(args.preset).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    if args.op == "decode":
        s = args.scale
        tile = TileConfig(sample_size=512 // s, latent_size=64 // s, sample_size_t=29, latent_size_t=8, overlap=0.125)
        x = torch.randn(1, 4, 24, 480 // 8 // s, 640 // 8 // s, generator=g)
        fn = lambda: model.decode(x, tiling=tile if args.tiled else None)  # noqa: E731
        shape = (93, 480 // s, 640 // s)
    else:
        t, h, w = args.clip
        x = torch.rand(1, 3, t, h, w, generator=g) * 2 - 1
        fn = lambda: model.encode_moments(x)  # noqa: E731
        shape = (t, h, w)
    times = []
    with torch.inference_mode():
        if args.op == "decode":  # one-time library set-up (oneDNN kernels, thread pool) outside the measurement
            model.decode(torch.randn(1, 4, 2, 2, 2, generator=g))
        for i in range(args.warmup + args.repeats):
            if i == args.warmup:
                base = _rss_kib("VmRSS")
                exact = _reset_peak()
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "op": args.op,
        "preset": args.preset,
        "tiled": args.tiled,
        "shape": shape,
        "seconds": min(times[args.warmup :]),
        "peak_mib": (peak - base) / 1024,
        "peak_exact": exact,
    }


def run_child(extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *extra]
    # glibc returns allocations above this size to the OS on free, so RSS follows live tensors
    # instead of keeping freed heap pages (which would blur a per-tile peak into a cumulative one)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        raise SystemExit(f"bench child {' '.join(extra)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scale", type=int, default=4, choices=(1, 2, 4, 8), help="spatial down-scale of 480x640 (default 4)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op", choices=("decode", "encode"), default="decode", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clip", type=int, nargs=3, default=(9, 64, 64), help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    common = ["--threads", str(args.threads), "--scale", str(args.scale)]
    print(f"CausalVAE bench, {args.threads} threads, one fresh process per row")
    rows = []
    for tiled in (False, True):
        rows.append(run_child(["--op", "decode", "--preset", "tiny", *common] + (["--tiled"] if tiled else []), 1800))
    for preset, clip, warm, rep in (("tiny", (9, 64, 64), 1, 3), ("osp12", (9, 64, 64), 1, 1)):
        rows.append(
            run_child(
                [
                    "--op",
                    "encode",
                    "--preset",
                    preset,
                    "--clip",
                    *map(str, clip),
                    "--warmup",
                    str(warm),
                    "--repeats",
                    str(rep),
                    *common,
                ],
                1800,
            )
        )
    print(f"{'op':8} {'preset':7} {'tiled':6} {'pixels TxHxW':14} {'seconds':>8} {'peak MiB':>9}")
    for r in rows:
        print(
            f"{r['op']:8} {r['preset']:7} {str(r['tiled']):6} {'x'.join(map(str, r['shape'])):14} "
            f"{r['seconds']:8.2f} {r['peak_mib']:9.1f}"
        )
    untiled, tiled = rows[0], rows[1]
    ratio = tiled["peak_mib"] / untiled["peak_mib"]
    print(
        f"decode peak memory tiled / untiled = {ratio:.3f} (target <= 0.25 at 93x480x640 tile counts; "
        f"here 93x{480 // args.scale}x{640 // args.scale}, tiles {512 // args.scale} px); "
        f"time tiled / untiled = {tiled['seconds'] / untiled['seconds']:.2f}"
    )
    for r in rows[2:]:
        print(f"encode {r['preset']}: {1 / r['seconds']:.2f} clips/s at {'x'.join(map(str, r['shape']))}")
    if not untiled["peak_exact"]:
        print("note: /proc/self/clear_refs unavailable; peaks include setup (ru_maxrss)")


if __name__ == "__main__":
    main()
