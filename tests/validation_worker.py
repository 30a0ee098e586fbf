"""2-process worker of tests/test_validation.py (torchrun, TP=2 + SP as the demo): the same training
with validation off, on (every 2 steps), and on across a resume.

    python -m torch.distributed.run --nproc_per_node 2 tests/validation_worker.py SHARDS PROMPTS OUT

Writes OUT/result-rank<r>.json: per scenario the losses, and which encoder modules the process loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.trainer import build_trainer

STEPS = 6
BANNED = ("osp.common.models.vae", "osp.common.models.text", "transformers", "osp.stage1_encode")


def config(out: Path, name: str, shards: str, prompts: str, steps: int, validate: bool) -> TrainConfig:
    d = {
        "run": {"seed": 3, "steps": steps, "ckpt_every": 3, "log_every": 0, "dir": str(out / name)},
        "data": {"shards": shards, "num_workers": 1, "batch_size": 2},
        "parallel": {"tp": 2, "sp": True},
        "optim": {"lr": 5e-4, "warmup_steps": 2, "ema_decay": 0.9},
        "log": {"wandb": validate},
    }
    if validate:
        d["validate"] = {"every": 2, "prompts": prompts, "steps": 3, "guidance": 4.0}
    return TrainConfig.from_dict(d)


def train(cfg: TrainConfig, resume: str = "") -> list:
    trainer = build_trainer(cfg, resume=resume)
    try:
        return [m["loss"] for m in trainer.fit()]
    finally:
        trainer.close()


def main() -> None:
    shards, prompts, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    res = {
        "off": train(config(out, "off", shards, prompts, STEPS, False)),
        "on": train(config(out, "on", shards, prompts, STEPS, True)),
    }
    first = train(config(out, "resumed", shards, prompts, 3, True))  # stops after step 3 (its checkpoint)
    res["resumed"] = first + train(config(out, "resumed", shards, prompts, STEPS, True), resume="auto")
    res["loaded"] = sorted(m for m in sys.modules if m.startswith(BANNED))
    rank = torch.distributed.get_rank()
    (out / f"result-rank{rank}.json").write_text(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
