"""2-process worker of tests/test_dryrun.py: the real Trainer on CPU at the tiny preset with DDP (DP=2, gloo),
ZeRO-1, the DP-sharded EMA and an asynchronous checkpoint save, measured with the dry run's own accounting.

    python -m torch.distributed.run --nproc_per_node 2 tests/dryrun_real_worker.py SHARDS OUT

Plays the dry run's sequence on real tensors: one batch drawn for the saved-activation probe, one step that
creates the optimizer state, then a steady-state step under `PeakMemory("cpu")` with what the rank holds
(`held_tensors`: parameters, AdamW shares, the EMA shard and the gradients in DDP's buckets) registered first;
then an asynchronous save, whose host staging (the copies `_CopyStager` makes) is counted. Writes
OUT/result-rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from osp.stage2_train import checkpoint as ckpt
from osp.stage2_train import dist as D
from osp.stage2_train import dryrun as DR
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.trainer import build_trainer


def staged_bytes(sd: dict) -> int:
    return DR.tensor_bytes(v.to_local() if hasattr(v, "to_local") else v for v in sd.values())


def main() -> None:
    shards, out = sys.argv[1], Path(sys.argv[2])
    cfg = TrainConfig.load(
        None,
        [
            f"data.shards={shards}",
            "model.preset=tiny",
            "run.device=cpu",
            "run.precision=fp32",
            f"run.dir={out / 'run'}",
            "run.async_ckpt=true",
            "data.num_workers=0",
            "run.tensorboard=false",
            "parallel.tp=1",
            "parallel.sp=false",
            "parallel.zero1=true",
        ],
    )
    staged: list[int] = []
    stage = ckpt._CopyStager.stage

    def counting_stage(self, sd):
        copy = stage(self, sd)
        staged.append(staged_bytes(copy))
        return copy

    ckpt._CopyStager.stage = counting_stage
    trainer = build_trainer(cfg)
    try:
        L = trainer.layout
        batch = next(trainer.loader)  # the dry run draws one batch for its activation probe
        act = {m: DR.saved_activation_bytes(trainer, batch, m) for m in DR.CHECKPOINTING}
        trainer.train_step()  # creates the optimizer state
        peak = DR.PeakMemory("cpu")
        peak.track(DR.held_tensors(trainer))
        with peak:
            trainer.train_step()
        trainer.save()  # asynchronous: staged now, written in the background
        async_pending = trainer.checkpoints.pending
        trainer.checkpoints.wait()
        res = {
            "layout": {"world": L.world, "rank": L.rank, "dp": L.dp, "dp_rank": L.dp_rank, "tp": L.tp},
            "ddp": trainer.dp.ddp is not None,
            "zero": trainer.optimizer.zero is not None,
            "ema_sharded": trainer.ema is not None and trainer.ema.dp_size > 1,
            "async_pending": bool(async_pending),
            "params": DR.tensor_bytes(trainer.model.parameters()),
            "grads": DR.tensor_bytes(p.grad for p in trainer.params if p.grad is not None),
            "optimizer": DR.tensor_bytes(DR.optimizer_tensors(trainer.optimizer)),
            "ema": DR.tensor_bytes(trainer.ema.shadow.values()),
            "peak": peak.peak,
            "activations": act,
            "host_staging": staged,
        }
    finally:
        trainer.close()
        ckpt._CopyStager.stage = stage
    (out / f"result-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
