"""Worker of tests/test_checkpoint.py (torchrun, 2 or 4 processes): train, save, resume on other layouts.

    python -m torch.distributed.run --nproc_per_node 2 tests/ckpt_worker.py SHARDS OUT src,tp1dp2,tp1dp2_ref
    python -m torch.distributed.run --nproc_per_node 4 tests/ckpt_worker.py SHARDS OUT tp2dp2z,tp2dp2z_ref

Scenarios (same seed, data and global batch of 2 samples per step):
    src          TP=2 + SP, DP=1, batch 2: 6 steps, checkpoint at step 6 (OUT/src/checkpoints/step-0000006)
    tp1dp2       resume src at TP=1, DP=2, batch 1: check the loaded state, re-save it at once, 3 steps
    tp2dp2z      resume src at TP=2, DP=2, ZeRO-1, batch 1: same
    *_ref        the uninterrupted run of 9 steps at that layout
OUT/<scenario>-rank<r>.json: losses, per-step sample keys (this rank's), layout, checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from osp.stage2_train.checkpoint import load_training_weights
from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from tp_worker import _gather, gather_full_state_dict  # noqa: E402 (tests/ is the script's folder)
from osp.stage2_train.trainer import Trainer, build_trainer

SRC_STEPS, MORE = 6, 3
LAYOUTS = {
    "src": {"parallel": {"tp": 2, "sp": True}, "data": {"batch_size": 2}},
    "tp1dp2": {"parallel": {"tp": 1}, "data": {"batch_size": 1}},
    "tp2dp2z": {"parallel": {"tp": 2, "sp": True, "zero1": True}, "data": {"batch_size": 1}},
}


def config(out: Path, name: str, shards: str) -> TrainConfig:
    layout = LAYOUTS[name.removesuffix("_ref")]
    d = {
        "run": {
            "seed": 5,
            "steps": SRC_STEPS if name == "src" else SRC_STEPS + MORE,
            "ckpt_every": 0,
            "log_every": 0,
            "tensorboard": False,
            "dir": str(out / name),
        },
        "data": {"shards": shards, "num_workers": 0, **layout["data"]},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "parallel": layout["parallel"],
    }
    return TrainConfig.from_dict(d)


def run_steps(trainer: Trainer, n: int) -> tuple[list, list]:
    losses, keys = [], []
    for _ in range(n):
        m = trainer.train_step()
        losses.append(m["loss"])
        keys.append(trainer.last_keys)
    return losses, keys


def check_loaded(trainer: Trainer, saved: dict, ema_saved: dict) -> dict:
    """The resumed model and EMA, gathered over TP, equal the saved global tensors exactly."""
    full = gather_full_state_dict(trainer.model)
    model_ok = full.keys() == saved.keys() and all(torch.equal(full[k], saved[k]) for k in saved)
    shadow = trainer.ema.gathered(trainer.model)  # the EMA is sharded over DP: whole on DP rank 0 only
    if shadow is None:  # DP rank 0 of each TP position checks the EMA
        return {"model_equal": bool(model_ok), "ema_equal": True}
    if trainer.layout.tp > 1:  # gather the EMA shards like the model's
        shadow = {k: _gather(k, v, trainer.layout.tp, trainer.layout.tp_group) for k, v in shadow.items()}
    ema_ok = shadow.keys() == ema_saved.keys() and all(torch.equal(shadow[k], ema_saved[k]) for k in ema_saved)
    return {"model_equal": bool(model_ok), "ema_equal": bool(ema_ok)}


def main() -> None:
    shards, out, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    src_ckpt = out / "src" / "checkpoints" / f"step-{SRC_STEPS:07d}"
    for name in names:
        cfg = config(out, name, shards)
        result: dict = {}
        if name == "src" or name.endswith("_ref"):
            trainer = build_trainer(cfg)
            result["losses"], result["keys"] = run_steps(trainer, cfg.run.steps)
            if name == "src":
                trainer.save()
        else:
            _, saved = load_training_weights(src_ckpt, prefer_ema=False)
            _, ema_saved = load_training_weights(src_ckpt, prefer_ema=True)
            trainer = build_trainer(cfg, resume=str(src_ckpt))
            result["checks"] = check_loaded(trainer, saved, ema_saved)
            result["start_step"] = trainer.step
            result["loader"] = trainer.loader.state_dict()
            trainer.save()  # the loaded state, written again at this layout (compared offline by the test)
            result["losses"], result["keys"] = run_steps(trainer, MORE)
        L = trainer.layout
        result.update(tp_rank=L.tp_rank, dp_rank=L.dp_rank, dp=L.dp, tp=L.tp)
        trainer.close()
        (out / f"{name}-rank{dist.get_rank()}.json").write_text(json.dumps(result))
        dist.barrier()
    D.shutdown()


if __name__ == "__main__":
    main()
