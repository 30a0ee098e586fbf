"""Checkpoint retention (run.keep_last, run.keep_every): which steps remain, and a kill -9 in the middle
of a deletion leaves `latest` loadable (the interrupted deletion is cleaned at the next start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_shards  # noqa: E402

from osp.stage2_train import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(run: Path, shards: Path, steps: int, env: dict | None = None, **keys) -> subprocess.Popen:
    over = {
        "data.shards": shards,
        "run.dir": run,
        "run.steps": steps,
        "run.ckpt_every": 1,
        "run.keep_last": 2,
        "run.keep_every": 4,
        "data.num_workers": 0,
        "run.log_every": 0,
        "run.tensorboard": "false",
        "parallel.tp": 1,
        "parallel.sp": "false",
        "run.async_ckpt": "true",
        **keys,
    }
    cmd = [sys.executable, "-m", "osp.stage2_train.run", str(ROOT / "stage2_train/configs/demo.toml")]  # a rank
    cmd += ["run.resume=auto"] + [f"{k}={v}" for k, v in over.items()]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(ckroot: Path) -> list[int]:
    return sorted(ckpt.published_steps(ckroot))


def test_retained_rule():
    assert ckpt.retained(list(range(1, 11)), 10, 2, 4) == {4, 8, 9, 10}
    assert ckpt.retained(list(range(1, 11)), 10, 0, 4) == set(range(1, 11))  # keep_last=0: keep all
    assert ckpt.retained([3, 5, 7], 3, 1, 0) == {3, 7}  # never the one `latest` names


@pytest.mark.slow
def test_keep_last_2_keep_every_4_over_10_steps(tmp_path):
    shards = make_shards(tmp_path / "shards", 8)
    run = tmp_path / "run"
    p = _run(run, shards, 10)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    ckroot = run / "checkpoints"
    assert _steps(ckroot) == [4, 8, 9, 10]
    assert (ckroot / "latest").read_text().strip() == "step-0000010"
    assert not list(ckroot.glob(".deleting-*")) and not list(ckroot.glob(".tmp-*"))
    deleted = sorted(int(line.split("step-")[1][:7]) for line in out.splitlines() if "deleted checkpoint" in line)
    assert deleted == [1, 2, 3, 5, 6, 7]  # every deletion is logged, once


@pytest.mark.slow
def test_kill9_during_a_deletion_leaves_latest_loadable(tmp_path):
    shards = make_shards(tmp_path / "shards", 8)
    run = tmp_path / "run"
    ckroot = run / "checkpoints"
    # keep_last=1: publishing step 2 deletes step 1; that deletion stops half-way for a long time
    p = _run(run, shards, 6, {"OSP_TEST_SLOW_DELETE_S": "300"}, **{"run.keep_last": 1, "run.keep_every": 0})
    deadline = time.time() + 200
    while not list(ckroot.glob(".deleting-step-*")):
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]  # pyright: ignore
        time.sleep(0.05)
    time.sleep(0.5)  # inside the removal: half of the files are gone
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)  # reaps it and closes its pipes
    (doomed,) = ckroot.glob(".deleting-step-*")
    latest = ckpt.read_latest(ckroot)
    assert latest is not None and latest.name == "step-0000002" and doomed.name == ".deleting-step-0000001"
    # the checkpoint `latest` names is whole: its weights and EMA read, and a resume continues from it
    config, weights = ckpt.load_training_weights(latest)
    assert weights and ckpt.find(run, "auto") == latest
    p = _run(run, shards, 4, **{"run.keep_last": 1, "run.keep_every": 0})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "resuming from" in out and "step-0000002" in out
    assert "removed .deleting-step-0000001" in out
    assert _steps(ckroot) == [4] and not list(ckroot.glob(".deleting-*"))
