"""Training worker of tests/test_cp.py: TP=1 x CP=N on the tiny DiT, uninterrupted and resumed.

    python tests/cp_train_worker.py SHARDS OUT 1                                   (CP=1, one process)
    python -m torch.distributed.run --nproc_per_node 2 tests/cp_train_worker.py SHARDS OUT 2
    python -m torch.distributed.run --nproc_per_node 2 tests/cp_train_worker.py SHARDS OUT ema   (DP=2: sharded EMA)

Writes OUT/result-rank<r>.json: the layout, and per run the losses, grad norms and sample keys per step
(under CP also a run checkpointed at step 2 and resumed).
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
# 4 heads so that the layout is the tiny DiT with heads divisible by CP (the preset has 2)
DIT = {
    "num_layers": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 12,
    "caption_channels": 64,
    "cross_attention_dim": 48,
    "sample_size": [6, 8],
    "sample_size_t": 3,
}


def config(shards: str, run_dir: Path, cp: int, steps: int, preset: Path) -> TrainConfig:
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
            "data": {"batch_size": 2, "num_workers": 0, "shards": shards},
            "model": {"preset": str(preset)},
            "parallel": {"tp": 1, "cp": cp},
            "optim": {"lr": 1e-3},
        }
    )


def train(cfg: TrainConfig, resume: str = "") -> tuple[Trainer, dict]:
    trainer = build_trainer(cfg, resume=resume)
    start = trainer.step
    losses, norms, keys = [], [], []
    while trainer.step < cfg.run.steps:
        m = trainer.train_step()
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        keys.append(trainer.last_keys)
    return trainer, {"from": start, "losses": losses, "grad_norms": norms, "keys": keys}


def sharded_ema(shards: str, out: Path, preset: Path) -> dict:
    """DP=2: the EMA sharded over DP vs an unsharded EMA updated alongside, then through a checkpoint."""
    from osp.stage2_train.optim import EMA

    cfg = config(shards, out / "ema", 1, 3, preset)
    cfg.optim.ema_decay = 0.9
    trainer = build_trainer(cfg)
    ref = EMA(trainer.model, 0.9)
    for _ in range(cfg.run.steps):
        trainer.train_step()
        ref.update(trainer.model)
    ema = trainer.ema
    res = {
        "dp": trainer.layout.dp,
        "owned": sum(t.numel() for t in ema.shadow.values()),
        "total": sum(t.numel() for t in ref.shadow.values()),
        "owned_equal": all(torch.equal(v, ref.shadow[k]) for k, v in ema.shadow.items()),
    }
    full = ema.gathered(trainer.model)
    if full is not None:
        res["gathered_equal"] = set(full) == set(ref.shadow) and all(
            torch.equal(full[k].to(v.device), v) for k, v in ref.shadow.items()
        )
    trainer.save()
    trainer.close()
    resumed = build_trainer(cfg, resume="auto")
    res["resumed_equal"] = set(resumed.ema.shadow) == set(ema.shadow) and all(
        torch.equal(v, ema.shadow[k]) for k, v in resumed.ema.shadow.items()
    )
    res["resumed_updates"] = resumed.ema.updates
    resumed.close()
    return res


def main() -> None:
    shards, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    preset = out / "dit.json"
    from osp.common.models.dit import DiTConfig

    if not preset.exists():
        DiTConfig.from_dict(DIT).to_json(preset)
    if mode == "ema":
        res = sharded_ema(shards, out, preset)
        (out / f"result-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(res))
        D.shutdown()
        return
    cp = int(mode)
    res = {}
    trainer, res["full"] = train(config(shards, out / "full", cp, STEPS, preset))
    L = trainer.layout
    res["layout"] = {"tp": L.tp, "cp": L.cp, "dp": L.dp, "cp_rank": L.cp_rank}
    trainer.close()
    if cp > 1:  # the resume runs under CP only (CP=1 resume is tests/test_train.py's)
        trainer, _ = train(config(shards, out / "cut", cp, CUT, preset))
        trainer.save()
        trainer.close()
        trainer, res["resumed"] = train(config(shards, out / "cut", cp, STEPS, preset), resume="auto")
        trainer.close()
    rank = torch.distributed.get_rank()
    (out / f"result-rank{rank}.json").write_text(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
