"""Stage 1 bench: pipelined encode vs sequential (decode then encode, one clip at a time) on the
same inputs, plus clips/s and bytes per sample.

    python bench/encode.py [--rounds 2] [--workers 2] [--batch-size 4] [--height 48 --width 64]
                           [--clips-per-video 3] [--device auto] [--data DIR --vae DIR --text-encoder DIR]

Defaults: the demo dataset (no broken entries) and the tiny models, written to a temp folder; the
tiny preset geometry with a 4:3 size. Pipelined = DataLoader decode workers overlapped with batched
VAE + mT5 forwards; sequential = workers 0, batch 1. Only the encode loop is timed (model loading
is excluded); best of `rounds`, interleaved. Target: pipelined / sequential <= 0.7.
Bytes per sample are compared with storing the same sample naively (fp32 moments + fp32 text padded
to 512 tokens).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from osp.common import shards as S
from osp.common.config import TEXT_MAX_LENGTH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--vae")
    ap.add_argument("--text-encoder")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--clips-per-video", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from osp.stage1_encode.run import EncodeOptions, encode

    tmp = Path(tempfile.mkdtemp(prefix="osp-bench-encode-"))
    try:
        data, vae, text = args.data, args.vae, args.text_encoder
        if data is None:
            from osp.common.demo_data import write_demo_dataset

            data = str(tmp / "data")
            write_demo_dataset(data, with_bad=False)
        if vae is None or text is None:
            from osp.common.demo_models import write_demo_models

            write_demo_models(tmp / "models")
            vae, text = vae or str(tmp / "models" / "vae"), text or str(tmp / "models" / "text_encoder")

        def run(name: str, workers: int, batch: int) -> dict:
            out = tmp / name
            shutil.rmtree(out, ignore_errors=True)
            r = encode(
                EncodeOptions(
                    data=data,
                    out=str(out),
                    preset=args.preset,
                    vae=vae,
                    text_encoder=text,
                    frames=args.frames,
                    height=args.height,
                    width=args.width,
                    clips_per_video=args.clips_per_video,
                    workers=workers,
                    batch_size=batch,
                    device=args.device,
                    progress=False,
                    samples_per_shard=64,
                )
            )
            r["tar_bytes"] = sum(S.shard_path(out, i).stat().st_size for i in S.published_shards(out))
            return r

        run("warmup", 0, 1)  # page cache, lazy imports, allocator
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, w, b in (("sequential", 0, 1), ("pipelined", args.workers, args.batch_size)):
                r = run(name, w, b)
                if name not in best or r["encode_seconds"] < best[name]["encode_seconds"]:
                    best[name] = r
        seq, pipe = best["sequential"], best["pipelined"]
        n = pipe["samples"]
        assert n == seq["samples"] > 0, "both runs must encode the same samples"
        manifest = S.read_manifest(tmp / "pipelined")
        c, t, h, w = manifest["latent"]["shape"]
        naive = c * t * h * w * 4 + TEXT_MAX_LENGTH * manifest["text"]["dim"] * 4
        ratio = pipe["encode_seconds"] / seq["encode_seconds"]
        print(
            f"inputs: {n} clips ({pipe['errors']} errors), {manifest['geometry']['num_frames']}x{args.height}x{args.width}, "
            f"device {args.device}, workers {args.workers}, batch {args.batch_size}"
        )
        print(f"sequential: {seq['encode_seconds']:.2f} s  {n / seq['encode_seconds']:.2f} clips/s")
        print(f"pipelined:  {pipe['encode_seconds']:.2f} s  {n / pipe['encode_seconds']:.2f} clips/s")
        print(f"pipelined / sequential wall time: {ratio:.2f}  (target <= 0.7)")
        print(
            f"bytes/sample: {pipe['tar_bytes'] / n:,.0f} (tar, incl. json + headers) vs naive fp32 padded-512 "
            f"{naive:,} -> {pipe['tar_bytes'] / n / naive:.3f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
