"""Sampling cost split: seconds per denoising step vs VAE decode time, and tiled vs untiled decode memory.

Upstream users report the VAE decode dominating short samplings; this prints both figures for the
tiny pipeline (random weights, tiny preset 9 x 64 x 64) through the real `osp sample` code path:
* text encoding (negative + positive, 512 tokens), once;
* seconds per denoising step, with CFG (batch 2) and guidance 1.0 (batch 1);
* VAE decode seconds for one video;
* tiled vs untiled decode of a larger latent (default 9 x 256 x 256 px), peak memory of each:
  on an accelerator the device allocator's peak, on CPU the peak RSS growth of a fresh child
  process (the decode runs in its own process so that earlier peaks do not hide it). The tile is
  scaled down with the model (128 px / 16 latent px spatial tiles, overlap 0.125; 9 / 3 frames, so
  9-frame clips are one temporal chunk) so that the tiled path really tiles spatially.

Usage: python bench/sample.py [--steps 10] [--size 128] [--device cpu]   (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

BENCH_TILE = dict(sample_size=128, latent_size=16, sample_size_t=9, latent_size_t=3, overlap=0.125)


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _decode_child(vae_dir: str, latent_shape: tuple, tiled: bool, queue) -> None:
    """Run in a fresh process: one decode, report seconds and peak RSS growth."""
    from osp.common.config import TileConfig
    from osp.common.models.vae import load_vae

    vae = load_vae(vae_dir).eval()
    z = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    tiling = TileConfig(**BENCH_TILE) if tiled else None
    with torch.no_grad():
        vae.decode(z[:, :, :1, :8, :8], tiling=None)  # warm-up (small)
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        out = vae.decode(z, tiling=tiling)
        sec = time.perf_counter() - t0
        peak = _status_bytes("VmHWM")
    queue.put({"seconds": sec, "peak_bytes": max(0, peak - base), "shape": list(out.shape)})


def decode_memory_cpu(vae_dir: Path, latent_shape: tuple, tiled: bool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_decode_child, args=(str(vae_dir), latent_shape, tiled, q))
    p.start()
    res = q.get()
    p.join()
    return res


def decode_memory_device(vae, latent_shape: tuple, tiled: bool, dev) -> dict:
    from osp.common.config import TileConfig

    z = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)).to(dev.torch_device(), vae.dtype)
    tiling = TileConfig(**BENCH_TILE) if tiled else None
    with torch.no_grad():
        vae.decode(z[:, :, :1, :8, :8])
        dev.synchronize()
        getattr(torch, dev.type).reset_peak_memory_stats()
        base = getattr(torch, dev.type).memory_allocated()
        t0 = time.perf_counter()
        out = vae.decode(z, tiling=tiling)
        dev.synchronize()
        sec = time.perf_counter() - t0
    return {"seconds": sec, "peak_bytes": dev.max_memory_allocated() - base, "shape": list(out.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="denoising steps timed (after one warm-up step)")
    ap.add_argument("--size", type=int, default=256, help="pixel height = width of the tiled/untiled decode")
    ap.add_argument("--frames", type=int, default=9, help="frames of the tiled/untiled decode (1 + 4k)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from osp.common.config import NEGATIVE_PROMPT, latent_frames
    from osp.stage2_train.state_dict_adapter import save_dit_checkpoint
    from osp.common.demo_models import write_demo_models
    from osp.common.device import pick_device
    from osp.common.models.dit import build_dit
    from osp.stage2_train.checkpoint import open_dit
    from osp.common.sampling import (
        decode_latents,
        denoise,
        initial_noise,
        load_models,
        make_scheduler,
        prepare_prompt,
        trained_size,
    )

    dev = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = write_demo_models(tmp / "models", seed=0)
        torch.manual_seed(0)
        dit = build_dit("tiny")
        save_dit_checkpoint(tmp / "ckpt", [dit.state_dict()], dit.config)
        m = load_models(open_dit(tmp / "ckpt"), info["vae"], info["text_encoder"], device=dev.type)
        f, h, w = trained_size(m.dit_config)
        shape = (1, 4, latent_frames(f), h // 8, w // 8)

        t0 = time.perf_counter()
        emb, mask = m.text_encoder.encode(
            [prepare_prompt(NEGATIVE_PROMPT, template=False), prepare_prompt("a red ball")]
        )
        dev.synchronize()
        t_text = time.perf_counter() - t0
        emb = emb.to(m.dtype)

        def per_step(text, tmask, guidance):
            noise = initial_noise(shape, 0).to(m.device)
            denoise(m.dit, make_scheduler(), noise, text, tmask, 1, guidance, 0, m.dtype)  # warm-up
            dev.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                lat = denoise(m.dit, make_scheduler(), noise, text, tmask, args.steps, guidance, 0, m.dtype)
            dev.synchronize()
            return (time.perf_counter() - t) / args.steps, lat

        with torch.no_grad():
            s_cfg, lat = per_step(emb, mask, 7.5)
            s_cond, _ = per_step(emb[1:], mask[1:], 1.0)
            decode_latents(m.vae, lat[:, :, :1], tiling=False)  # warm-up
            dev.synchronize()
            t = time.perf_counter()
            decode_latents(m.vae, lat, tiling=True)
            dev.synchronize()
            t_decode = time.perf_counter() - t

        big = (1, 4, latent_frames(args.frames), args.size // 8, args.size // 8)
        if dev.is_accelerator:
            untiled = decode_memory_device(m.vae, big, False, dev)
            tiled = decode_memory_device(m.vae, big, True, dev)
        else:
            untiled = decode_memory_cpu(Path(info["vae"]), big, False)
            tiled = decode_memory_cpu(Path(info["vae"]), big, True)

    res = {
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "geometry": f"{f}x{h}x{w}",
        "text_encode_s": t_text,
        "step_s_cfg": s_cfg,
        "step_s_cond_only": s_cond,
        "vae_decode_s": t_decode,
        "decode_over_step_cfg": t_decode / s_cfg,
        "decode_geometry": f"{args.frames}x{args.size}x{args.size}",
        "untiled": untiled,
        "tiled": tiled,
        "tiled_over_untiled_peak": tiled["peak_bytes"] / max(1, untiled["peak_bytes"]),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    mib = 1 << 20
    print(f"sampling bench on {res['device']} ({res['dtype']}), tiny models, video {res['geometry']}")
    print(f"  text encode (neg + pos, 512 tok)   {t_text:8.3f} s")
    print(f"  denoise step, CFG (batch 2)        {s_cfg:8.4f} s/step")
    print(f"  denoise step, guidance 1.0         {s_cond:8.4f} s/step")
    print(f"  VAE decode, one video              {t_decode:8.3f} s  (= {res['decode_over_step_cfg']:.1f} CFG steps)")
    print(f"decode {res['decode_geometry']} px, tile {BENCH_TILE}")
    print(f"  untiled  {untiled['seconds']:7.2f} s  peak +{untiled['peak_bytes'] / mib:8.1f} MiB")
    print(f"  tiled    {tiled['seconds']:7.2f} s  peak +{tiled['peak_bytes'] / mib:8.1f} MiB")
    print(f"  tiled / untiled peak memory: {res['tiled_over_untiled_peak']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
