"""2-process worker of tests/test_train.py (launched with torchrun): several trainings in one launch.

    python -m torch.distributed.run --nproc_per_node 2 tests/train_worker.py SHARDS OUT

Writes OUT/result-rank<r>.json with, per scenario, the loss sequence, the sample keys of every step
and a fixed-noise evaluation loss before and after training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from osp.stage2_train.config import TrainConfig
from osp.stage2_train.data import ShardLoader
from osp.stage2_train.trainer import Trainer, build_trainer

BASE = {
    "run": {"seed": 7, "steps": 3, "ckpt_every": 0, "log_every": 0, "tensorboard": False},
    "data": {"batch_size": 2, "num_workers": 0},
    "optim": {"lr": 1e-3},
}

SCENARIOS = {
    # name: (overrides, steps)
    "tp2_sp": ({"parallel": {"tp": 2, "sp": True}}, 16),
    "tp2_nosp": ({"parallel": {"tp": 2, "sp": False}}, 3),
    "dp2": ({"parallel": {"tp": 1}, "data": {"num_workers": 1}}, 16),
    "dp2_zero1": ({"parallel": {"tp": 1, "zero1": True}}, 4),
}


def eval_loss(trainer: Trainer, batch) -> float:
    """Loss on a fixed batch with fixed draws (step/micro ids far outside the run)."""
    with torch.no_grad():
        return float(trainer.micro_loss(batch, 10**6, 0).mean())


def main() -> None:
    shards, out = sys.argv[1], Path(sys.argv[2])
    results = {}
    for name, (over, steps) in SCENARIOS.items():
        d = json.loads(json.dumps(BASE))
        for sec, vals in over.items():
            d.setdefault(sec, {}).update(vals)
        d["run"]["steps"] = steps
        d["run"]["dir"] = str(out / name)
        d["data"]["shards"] = shards
        # cfg dropout off for the overfitting check so that every step sees the captions
        d.setdefault("diffusion", {})["cfg_dropout"] = 0.0
        cfg = TrainConfig.from_dict(d)
        trainer = build_trainer(cfg)
        L = trainer.layout
        probe = next(ShardLoader(shards, batch_size=2, dp_rank=L.dp_rank, dp_size=L.dp, seed=123))
        before = eval_loss(trainer, probe)
        losses, keys, norms = [], [], []
        for _ in range(steps):
            m = trainer.train_step()
            losses.append(m["loss"])
            norms.append(m["grad_norm"])
            keys.append(trainer.last_keys)
        after = eval_loss(trainer, probe)
        results[name] = {
            "losses": losses,
            "keys": keys,
            "grad_norms": norms,
            "eval_before": before,
            "eval_after": after,
            "tp_rank": trainer.layout.tp_rank,
            "dp_rank": trainer.layout.dp_rank,
        }
        trainer.close()
    rank = torch.distributed.get_rank()
    (out / f"result-rank{rank}.json").write_text(json.dumps(results))
    from osp.stage2_train import dist as D

    D.shutdown()


if __name__ == "__main__":
    main()
