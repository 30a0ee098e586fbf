"""Single-process cases of tests/test_train.py, run in one subprocess (one torch/megatron import).

    python tests/train_cases.py WORKDIR   ->  WORKDIR/cases.json

Each case calls the real entry point `osp.stage2_train.run.main` with a loaded config (or the Trainer) and records its
exit code, its stderr line and the metrics it wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import corrupt_sample, make_shards  # noqa: E402


def metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def main() -> None:
    work = Path(sys.argv[1])
    from osp.stage2_train import run
    from osp.stage2_train.config import TrainConfig

    results: dict[str, dict] = {}
    base = ["run.steps=2", "run.log_every=0", "run.tensorboard=false", "data.batch_size=2", "data.num_workers=0"]

    def call(name: str, shards: Path, *extra: str) -> dict:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = run.main(TrainConfig.load(None, [f"data.shards={shards}", f"run.dir={work / name}", *base, *extra]))
        r = {"rc": rc, "stderr": err.getvalue(), "metrics": metrics(work / name)}
        results[name] = r
        return r

    good = Path(sys.argv[2]) if len(sys.argv) > 2 else make_shards(work / "good", 8)

    # 0. TP=1 reference of the worker's 2-process scenarios (same shards, seed, global batch)
    ref = ["run.seed=7", "run.steps=3", "run.ckpt_every=0", "optim.lr=1e-3", "diffusion.cfg_dropout=0.0"]
    call("tp1_ref", good, *ref)

    # 1. a real step, then: no transformers, no VAE, no stage 1 in this process
    call("guarantee", good, "run.ckpt_every=1")
    banned = [
        m
        for m in sys.modules
        if m == "transformers"
        or m.startswith("transformers.")
        or m == "osp.common.models.vae"
        or m.startswith("osp.stage1_encode")
        or m == "osp.common.models.text"
    ]
    results["guarantee"]["banned_modules"] = banned

    # 2. --init from a converted checkpoint (the model weights of case 1), strict
    from osp.stage2_train.checkpoint import load_dit_checkpoint
    from osp.stage2_train.state_dict_adapter import save_dit_checkpoint

    cfg1, sd1 = load_dit_checkpoint(work / "guarantee" / "checkpoints" / "step-0000002", prefer_ema=False)
    save_dit_checkpoint(work / "init_ckpt", [sd1], cfg1)
    cfg = TrainConfig.load(
        None, [f"data.shards={good}", f"run.dir={work / 'init'}", *base, f"model.init={work / 'init_ckpt'}"]
    )
    from osp.stage2_train.trainer import build_trainer

    trainer = build_trainer(cfg)
    results["init"] = {"equal": all(bool((trainer.model.state_dict()[k] == v).all()) for k, v in sd1.items())}
    trainer.close()
    from osp.stage2_train import dist as D

    D.shutdown()
    bad_cfg = dict(cfg1.to_dict(), num_layers=3)
    bad_cfg.pop("_class_name")
    (work / "init_bad").mkdir()
    from osp.common.models.dit import DiTConfig

    save_dit_checkpoint(work / "init_bad", [sd1], cfg1)
    DiTConfig.from_dict(bad_cfg).to_json(work / "init_bad" / "config.json")
    call("init_mismatch", good, f"model.init={work / 'init_bad'}")

    # 3. geometry of the shards vs the model
    tiny = DiTConfig.from_dict(dict(cfg1.to_dict(), sample_size=[16, 16]))
    tiny.to_json(work / "dit_16.json")
    call("geometry", good, f"model.preset={work / 'dit_16.json'}")
    DiTConfig.from_dict(dict(cfg1.to_dict(), caption_channels=32)).to_json(work / "dit_txt32.json")
    call("text_dim", good, f"model.preset={work / 'dit_txt32.json'}")

    # 4. impossible layouts
    call("layout_world", good, "parallel.tp=2")

    # 5. corrupt sample: stop (file + key), or skip and count (DataLoader worker path)
    bad = work / "corrupt"
    shutil.copytree(good, bad)
    corrupt_sample(bad, "clip0003")
    call("corrupt_stop", bad, "run.steps=4")
    call("corrupt_skip", bad, "run.steps=4", "data.skip_corrupt=true", "data.num_workers=1")

    # 6. non-finite loss: stop with step + keys, or skip and count
    nan = make_shards(work / "nan", 4, nan_keys=("clip0002",))
    call("nan_stop", nan, "run.steps=4", "data.batch_size=1")
    call("nan_skip", nan, "run.steps=4", "data.batch_size=1", "run.nonfinite=skip")

    (work / "cases.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
