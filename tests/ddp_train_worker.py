"""2-process worker of tests/test_ddp.py: the Trainer at DP=2 with ZeRO AdamW, gradient accumulation and
small DDP buckets: uninterrupted, checkpointed at step 2 and resumed, and with the blocking reduction.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train_worker.py SHARDS OUT

Writes OUT/result-rank<r>.json: per run the losses and grad norms per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.trainer import Trainer, build_trainer

STEPS, CUT = 4, 2


def config(shards: str, run_dir: Path, steps: int, overlap: bool = True) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "run": {
                "seed": 7,
                "steps": steps,
                "ckpt_every": 0,
                "log_every": 0,
                "tensorboard": False,
                "dir": str(run_dir),
            },
            "data": {"batch_size": 1, "num_workers": 0, "shards": shards},
            "parallel": {"tp": 1, "zero1": True, "overlap_grad_reduce": overlap, "bucket_mb": 0.05},
            "optim": {"lr": 1e-3, "grad_accum": 2, "ema_decay": 0.9},
        }
    )


def train(cfg: TrainConfig, resume: str = "") -> tuple[Trainer, dict]:
    trainer = build_trainer(cfg, resume=resume)
    start = trainer.step
    losses, norms = [], []
    while trainer.step < cfg.run.steps:
        m = trainer.train_step()
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    return trainer, {
        "from": start,
        "losses": losses,
        "grad_norms": norms,
        "dp": trainer.layout.dp,
        "buckets": trainer.dp.hook.buckets,
        "zero": trainer.optimizer.zero is not None,
    }


def main() -> None:
    shards, out = sys.argv[1], Path(sys.argv[2])
    res = {}
    for name, overlap in (("full", True), ("blocking", False)):
        trainer, res[name] = train(config(shards, out / name, STEPS, overlap))
        trainer.close()
    trainer, _ = train(config(shards, out / "cut", CUT))
    trainer.save()
    trainer.close()
    trainer, res["resumed"] = train(config(shards, out / "cut", STEPS), resume="auto")
    trainer.close()
    (out / f"result-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
