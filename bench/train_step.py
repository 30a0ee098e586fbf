"""Stage 2 bench: training samples/s on cached shards vs the same DiT step fed online (upstream's way:
decode the video, run the CausalVAE and mT5 inside every step), plus data-wait time / step time.

    python bench/train_step.py [--steps 12] [--warmup 3] [--batch-size 2] [--workers 1] [--device auto]

Both paths run in this one process on the same machine with the same tiny DiT, optimizer and batch
size (TP=1): "cached" is `osp.stage2_train` reading the shards that stage 1 wrote (DataLoader workers,
posterior re-sampled per step); "online" decodes the same clips with decord in DataLoader workers,
encodes them with the tiny CausalVAE (fp32, training tiles) and the tiny mT5 (512-token padding, as
upstream) and then takes the identical optimizer step. Steps are timed after `warmup` steps.
This bench may import the encoders (it is not stage 2); the trainer itself never does.
At the real size the encoders dominate far more (VAE at 93x480x640, mT5-XXL); the GPU script in
bench/gpu/ measures the DiT step there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class OnlineLoader:
    """Endless batches made the upstream way: decode -> VAE moments -> mT5, every step."""

    def __init__(self, items, spec, enc, batch_size: int, workers: int):
        from osp.stage1_encode.run import decoded_stream

        self.items, self.spec, self.enc, self.batch_size, self.workers = items, spec, enc, batch_size, workers
        self.by_seq = {it.seq: it for it in items}
        self.decoded_stream = decoded_stream
        self.epoch, self.cursor = 0, 0
        self._it = None

    def _stream(self):
        while True:
            yield from self.decoded_stream(self.items, self.spec, self.workers)
            self.epoch += 1

    def __next__(self):
        from osp.common.models.text import clean_caption
        from osp.stage2_train.data import Batch

        if self._it is None:
            self._it = self._stream()
        got = []
        while len(got) < self.batch_size:
            d = next(self._it)
            if "clip" in d:
                got.append(d)
        moments = self.enc.encode_clips([d["clip"] for d in got])
        texts = self.enc.encode_text([clean_caption(self.by_seq[d["seq"]].caption) for d in got])
        L = max(t.shape[0] for t in texts)
        text = torch.zeros(len(texts), L, texts[0].shape[1], dtype=texts[0].dtype)
        mask = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            text[i, : t.shape[0]], mask[i, : t.shape[0]] = t, 1
        self.cursor += 1
        return Batch(moments, text, mask, [self.by_seq[d["seq"]].key for d in got], [], [], tuple(moments.shape[2:]))

    def close(self):
        self._it = None


def timed(trainer, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    ms = [trainer.train_step() for _ in range(steps)]
    wall = time.perf_counter() - t0
    samples = sum(m["samples_per_s"] * m["step_time_s"] for m in ms)
    wait = sum(m["data_wait_s"] for m in ms)
    return {
        "samples_per_s": samples / wall,
        "data_wait_frac": wait / wall,
        "step_s": wall / steps,
        "loss": ms[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from osp.common.demo_data import write_demo_dataset
    from osp.common.demo_models import write_demo_models
    from osp.stage1_encode.run import EncodeOptions, Encoders, build_plan
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.trainer import build_trainer

    tmp = Path(tempfile.mkdtemp(prefix="osp-bench-train-"))
    try:
        write_demo_dataset(tmp / "data")
        data = tmp / "data"
        models = write_demo_models(tmp / "models")
        opts = EncodeOptions(
            data=str(data),
            out=str(tmp / "shards"),
            preset="tiny",
            vae=str(models["vae"]),
            text_encoder=str(models["text_encoder"]),
            workers=args.workers,
            device=args.device,
            progress=False,
        )
        t0 = time.perf_counter()  # stage 1 in its own process, as `make encode` runs it
        subprocess.run(
            [
                sys.executable,
                "-m",
                "osp.common.cli",
                "encode",
                "--data",
                opts.data,
                "--out",
                opts.out,
                "--preset",
                "tiny",
                "--vae",
                opts.vae,
                "--text-encoder",
                opts.text_encoder,
                "--workers",
                str(args.workers),
                "--device",
                args.device,
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        encode_s = time.perf_counter() - t0

        cfg = TrainConfig.load(
            None,
            [
                f"data.shards={tmp / 'shards'}",
                f"run.dir={tmp / 'run'}",
                "run.steps=1000000",
                "run.ckpt_every=0",
                "run.log_every=0",
                "run.tensorboard=false",
                f"run.device={args.device}",
                "parallel.tp=1",
                f"data.batch_size={args.batch_size}",
                f"data.num_workers={args.workers}",
            ],
        )
        trainer = build_trainer(cfg)
        cached = timed(trainer, args.steps, args.warmup)

        plan = build_plan(opts)
        items = [it for s in plan.shards for it in s.items if it.kind == "video"]  # the cached run trains videos only
        enc = Encoders(str(models["vae"]), str(models["text_encoder"]), args.device, "float32", True, True)
        trainer.loader.close()
        trainer.loader = OnlineLoader(items, plan.spec, enc, args.batch_size, args.workers)
        online = timed(trainer, args.steps, args.warmup)
        trainer.close()
        from osp.stage2_train import dist as D

        D.shutdown()

        n = len(items)
        print(
            f"tiny preset, {n} demo clips, batch {args.batch_size}, device {trainer.device.type}, "
            f"{args.steps} timed steps after {args.warmup}; stage-1 encode of all clips once (incl. process start): {encode_s:.1f} s"
        )
        print(
            f"cached shards : {cached['samples_per_s']:8.2f} samples/s  {cached['step_s'] * 1e3:7.1f} ms/step  "
            f"data wait / step time {cached['data_wait_frac']:.1%}"
        )
        print(
            f"online encode : {online['samples_per_s']:8.2f} samples/s  {online['step_s'] * 1e3:7.1f} ms/step  "
            f"data wait / step time {online['data_wait_frac']:.1%}"
        )
        print(f"ratio cached / online samples/s: {cached['samples_per_s'] / online['samples_per_s']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
