"""wandb as an optional logger, offline: the training scalars are in the offline run file, and a
resumed run continues the same wandb run (its id kept in the run folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_shards  # noqa: E402
from wandb_records import history  # noqa: E402

ROOT = Path(__file__).parent.parent


def _train(run: Path, shards: Path, steps: int, wandb_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env["WANDB_DIR"] = str(wandb_dir)
    cmd = [sys.executable, "-m", "osp.stage2_train.run", str(ROOT / "stage2_train/configs/demo.toml")]  # a rank
    cmd += ["run.resume=auto", f"data.shards={shards}", f"run.dir={run}", f"run.steps={steps}", "run.ckpt_every=2"]
    cmd += ["data.num_workers=0", "run.log_every=0", "parallel.tp=1", "parallel.sp=false", "log.wandb=true"]
    cmd += ["log.project=osp-test"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wandb_offline_scalars_and_the_same_run_on_resume(tmp_path):
    shards = make_shards(tmp_path / "shards", 8)
    run, wdir = tmp_path / "run", tmp_path / "wandb"
    p = _train(run, shards, 2, wdir)
    assert p.returncode == 0, p.stderr[-3000:]
    run_id = (run / "wandb-id").read_text().strip()
    p = _train(run, shards, 4, wdir)  # resumes from step 2
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "wandb-id").read_text().strip() == run_id
    assert len(list(wdir.glob(f"wandb/offline-run-*-{run_id}"))) == 2  # both processes logged to that id
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["_step"]: r["train/loss"] for r in history(wdir, run_id) if "train/loss" in r}
    assert logged == {m["step"]: m["loss"] for m in metrics} and sorted(logged) == [1, 2, 3, 4]
