"""The accelerator path end to end on one CUDA GPU, self-checking (driven by bench/gpu/smoke.sh).

    python bench/gpu/smoke.py --out /tmp/osp-smoke                 # one CUDA GPU, real width, < 8 min
    python bench/gpu/smoke.py --out /tmp/osp-smoke --device cpu --tiny   # the same steps at tiny size on CPU

Steps (each one checked; any failure exits non-zero with the step's name):
  1. predict   `osp train --dry-run` of this very run (world 1, TP=1): peak memory and step FLOPs
  2. models    real-width CausalVAE (osp12) and an mT5 encoder of the real width (d_model 4096, one layer),
               random weights (no downloads)
  3. data      a few generated clips of 29 x 480 x 640 (pixabay_v2 layout)
  4. encode    `osp encode --preset osp12-29x480p` with the VAE in bf16
  5. train     `osp train`, 2 steps with a checkpoint, then `--resume auto` to step 5: TP=1 on NCCL (world 1
               still uses NCCL, which refuses CPU tensors in collectives); after each run only the newest
               checkpoint is kept (one ~44 GB checkpoint at real size, not one per run)
  6. sample    `osp sample --steps 2` from the checkpoint: an mp4
  7. report    SDPA backend actually used, warm step time (the steps after the first one of the resumed run),
               MFU from MODEL FLOPs (osp.stage2_train.roofline: 3x forward, no recompute) against the card's
               nominal dense bf16 peak, HFU (recompute and flash's 2.5x backward) beside it, the measured bf16
               matmul rate, peak memory beside the dry run's prediction

The output folder is the smoke's own: a new or empty folder gets a marker file; a non-empty folder without
it is refused (nothing a user passes is deleted), and a rerun replaces only the smoke's own results in it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_dit_gpu import NOMINAL_BF16_TFLOPS, matmul_peak  # noqa: E402

MARKER = ".osp-smoke"  # written into the output folder the smoke created or found empty
OWN = ("models", "data", "shards", "run", "samples", "smoke.json")  # what a rerun replaces
WARM_FROM = 4  # steps 1-2: first run; 3: first step after the resume (cold); 4-5: warm
REAL = {"preset": "osp12-29x480p", "vae": "osp12", "frames": 29, "height": 480, "width": 640, "clips": 4}
TINY = {"preset": "tiny", "vae": "tiny", "frames": 9, "height": 64, "width": 64, "clips": 2}


class SmokeError(RuntimeError):
    pass


def check(ok: bool, step: str, what: str) -> None:
    if not ok:
        raise SmokeError(f"{step}: {what}")


def osp(*args: str, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "osp.common.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise SmokeError(f"osp {args[0]} exited {r.returncode}: " + " | ".join(tail))
    return r.stdout


# ------------------------------------------------------------------------------------------------
# pieces (tested on CPU)
# ------------------------------------------------------------------------------------------------
def sdpa_backend(device: torch.device, heads: int = 4, seq: int = 256, head_dim: int = 64) -> str:
    """The aten kernel F.scaled_dot_product_attention dispatches to for the DiT's call pattern
    (bf16 on accelerators, an additive mask as the cross-attention passes)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 1, seq, device=device, dtype=dtype)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    names = [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::_scaled_dot_product")
        or e.name.startswith("aten::_flash")
        or e.name.startswith("aten::_efficient")
    ]
    kernels = [n for n in names if n != "aten::scaled_dot_product_attention"]
    return kernels[0].removeprefix("aten::") if kernels else "math"


def write_clips(root: Path, n: int, frames: int, height: int, width: int, fps: int = 24, seed: int = 0) -> Path:
    """n generated clips (moving gradients, distinct captions) + annotation.json, pixabay_v2 layout."""
    import numpy as np

    from osp.common.demo_data import write_mp4

    rng = np.random.default_rng(seed)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = rng.integers(0, 255, 3)
        video = np.empty((frames, height, width, 3), np.uint8)
        for f in range(frames):
            for c in range(3):
                video[f, :, :, c] = (base[c] + xx * (c + 1) // 4 + yy // 3 + 7 * f * (i + 1)) % 256
        name = f"clips/clip{i:03d}.mp4"
        write_mp4(root / name, video, fps)
        records.append(
            {
                "path": name,
                "cap": f"a smoke test clip number {i}",
                "fps": float(fps),
                "num_frames": frames,
                "duration": frames / fps,
                "resolution": {"height": height, "width": width},
            }
        )
    (root / "annotation.json").write_text(json.dumps(records))
    return root


def write_text_encoder(out: Path, d_model: int) -> Path:
    """An mT5 encoder of width `d_model` (one layer, random weights) with the tiny tokenizer."""
    from transformers import MT5Config, MT5EncoderModel

    from osp.common.models.text import TINY_D_MODEL, write_tiny_text_encoder

    write_tiny_text_encoder(out)
    if d_model == TINY_D_MODEL:
        return out
    cfg = MT5Config.from_pretrained(out)
    cfg.update({"d_model": d_model, "d_kv": 64, "num_heads": d_model // 64, "d_ff": 2 * d_model, "num_layers": 1})
    torch.manual_seed(0)
    MT5EncoderModel(cfg).save_pretrained(out)
    return out


def summary(
    warm: list[dict],
    predicted_peak_gib: float,
    model_flops: float,
    hardware_flops: float,
    nominal: float | None,
    matmul: float,
) -> dict:
    """MFU / HFU and memory figures of the warm steps (`warm`: their metrics.jsonl records; model_flops and
    hardware_flops: one step's, from the roofline model)."""
    step = sum(m["step_time_s"] for m in warm) / len(warm)
    tflops, hw = model_flops / step / 1e12, hardware_flops / step / 1e12
    peak = max(m["peak_mem_gb"] for m in warm)
    return {
        "step_time_s": step,
        "warm_steps": [m.get("step") for m in warm],
        "model_tflops": tflops,
        "hardware_tflops": hw,
        "mfu_nominal": tflops / nominal if nominal else None,
        "hfu_nominal": hw / nominal if nominal else None,
        "mfu_matmul": tflops / matmul if matmul else None,
        "peak_gib": peak,
        "predicted_peak_gib": predicted_peak_gib,
        "peak_vs_prediction": peak / predicted_peak_gib if predicted_peak_gib else None,
    }


def claim_output(out: Path) -> None:
    """Make `out` the smoke's folder: create it (or take an empty one) and mark it; a folder marked by an
    earlier smoke loses only the smoke's own results; any other non-empty folder is refused."""
    if out.exists() and not out.is_dir():
        raise SmokeError(f"setup: {out} is a file; pass a new or empty folder as --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SmokeError(
            f"setup: {out} is not empty and was not made by the smoke; pass a new or empty folder as --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("bench/gpu/smoke.py output folder\n")
    for name in OWN:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def keep_newest_checkpoint(run_dir: Path) -> None:
    """Remove every checkpoint of the run except the one `latest` names."""
    root = run_dir / "checkpoints"
    latest = (root / "latest").read_text().strip()
    for p in root.iterdir():
        if p.is_dir() and p.name != latest and not p.is_symlink():
            shutil.rmtree(p)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run(out: Path, device: str, tiny: bool) -> dict:
    from osp.common import config as C
    from osp.common.models.dit import get_dit_config
    from osp.common.models.vae import build_vae, save_vae
    from osp.stage2_train import dryrun
    from osp.stage2_train import roofline as R

    size = TINY if tiny else REAL
    claim_output(out)
    times, dev = {}, torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    check(dev.type == "cpu" or torch.cuda.is_available(), "setup", "no CUDA device; run with --device cpu --tiny")

    t = time.perf_counter()
    overrides = [
        f"model.preset={size['preset']}",
        "model.checkpointing=full",
        "optim.ema_decay=0.9999",
        "data.batch_size=1",
    ]
    cfg = dryrun.build_config(None, overrides, None, 1, None, None)
    report = dryrun.dry_run(cfg, 1, 0, 80.0)
    times["predict"] = time.perf_counter() - t
    check(report.step_flops > 0 and report.peak > 0, "predict", "the dry run measured nothing")

    t = time.perf_counter()
    models = out / "models"
    save_vae(build_vae(size["vae"]), models / "vae")
    write_text_encoder(models / "text_encoder", get_dit_config(size["preset"]).caption_channels)
    write_clips(out / "data", size["clips"], size["frames"], size["height"], size["width"])
    times["models+data"] = time.perf_counter() - t

    t = time.perf_counter()
    shards = out / "shards"
    osp(
        "encode",
        "--data",
        str(out / "data"),
        "--out",
        str(shards),
        "--preset",
        size["preset"],
        "--vae",
        str(models / "vae"),
        "--text-encoder",
        str(models / "text_encoder"),
        "--vae-dtype",
        "bfloat16" if dev.type == "cuda" else "float32",
        "--workers",
        "0",
        "--device",
        device,
        "--no-progress",
        "--batch-size",
        "1",
    )
    times["encode"] = time.perf_counter() - t
    check((shards / "manifest.json").exists(), "encode", f"{shards}/manifest.json missing")

    t = time.perf_counter()
    run_dir = out / "run"
    common = [
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"run.device={device}",
        "data.num_workers=0",
        "run.tensorboard=false",
        "parallel.tp=1",
        *overrides,
    ]
    osp("train", "run.steps=2", "run.ckpt_every=2", *common)
    check((run_dir / "checkpoints" / "latest").exists(), "train", "no checkpoint after 2 steps")
    osp("train", "--resume", "auto", "run.steps=5", "run.ckpt_every=0", *common)
    keep_newest_checkpoint(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times["train"] = time.perf_counter() - t
    check(
        [m["step"] for m in metrics] == [1, 2, 3, 4, 5],
        "train",
        f"steps logged {[m['step'] for m in metrics]}, expected 1 to 5",
    )
    check(all(m["loss"] is not None and m["loss"] == m["loss"] for m in metrics), "train", "a non-finite loss")

    t = time.perf_counter()
    osp(
        "sample",
        "--checkpoint",
        str(run_dir),
        "--vae",
        str(models / "vae"),
        "--text-encoder",
        str(models / "text_encoder"),
        "--prompt",
        "a smoke test",
        "--steps",
        "2",
        "--out",
        str(out / "samples"),
        "--device",
        device,
    )
    times["sample"] = time.perf_counter() - t
    check(any((out / "samples").glob("*.mp4")), "sample", "no mp4 written")

    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    matmul = matmul_peak(dev, 8192 if dev.type == "cuda" else 256, 5)
    dit = get_dit_config(size["preset"])
    flops = {  # one step of this run (batch 1, world 1, full recompute): model and hardware FLOPs
        "model": R.model_flops(dit, report.tokens, C.TEXT_MAX_LENGTH),
        "hardware": R.hardware_flops(dit, report.tokens, C.TEXT_MAX_LENGTH, checkpointing="full"),
    }
    warm = [m for m in metrics if m["step"] >= WARM_FROM]
    s = summary(warm, report.peak / 2**30, flops["model"], flops["hardware"], nominal, matmul)
    return {
        "card": name,
        "preset": size["preset"],
        "sdpa": sdpa_backend(dev),
        "matmul_tflops": matmul,
        **s,
        "times_s": times,
        "model_tflop_per_step": flops["model"] / 1e12,
        "hardware_tflop_per_step": flops["hardware"] / 1e12,
        "dry_run": {"peak_gib": report.peak / 2**30, "counted_step_tflop": report.step_flops / 1e12},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/osp-smoke")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny models and clips (the CPU rehearsal)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        r = run(Path(args.out), args.device, args.tiny)
    except SmokeError as e:
        print(f"SMOKE FAILED at {e}", file=sys.stderr)
        return 1
    na = "n/a (card not in NOMINAL_BF16_TFLOPS)"
    mfu = f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] is not None else na
    hfu = f"{r['hfu_nominal']:.1%}" if r["hfu_nominal"] is not None else na
    print(f"card {r['card']}  preset {r['preset']}  SDPA kernel {r['sdpa']}")
    print(
        f"warm step time {r['step_time_s']:.2f} s (steps {r['warm_steps']})  model {r['model_tflops']:.1f} TFLOP/s "
        f"({r['model_tflop_per_step']:.2f} TFLOP/step: 3x forward, no recompute)  MFU {mfu} of nominal bf16  "
        f"HFU {hfu} (hardware {r['hardware_tflop_per_step']:.2f} TFLOP/step: full recompute, flash backward 2.5x); "
        f"MFU {r['mfu_matmul']:.1%} of the measured bf16 matmul rate ({r['matmul_tflops']:.0f} TFLOP/s)"
    )
    print(
        f"peak memory {r['peak_gib']:.2f} GiB; dry-run prediction {r['predicted_peak_gib']:.2f} GiB "
        f"(ratio {r['peak_vs_prediction']:.2f}; the dry run measures the same bf16 regime on meta tensors)"
    )
    print(
        "times "
        + "  ".join(f"{k} {v:.0f} s" for k, v in r["times_s"].items())
        + f"  total {time.perf_counter() - t0:.0f} s"
    )
    (Path(args.out) / "smoke.json").write_text(json.dumps(r, indent=1))
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
