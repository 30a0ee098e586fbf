"""What a user sees: a normal run prints no third-party noise, a user error is one line per rank (plus
one launcher line, no torchrun traceback block), a bug keeps its traceback."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.common.errors import ConfigError  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "stage2_train" / "configs" / "demo.toml"
NOISE = re.compile(r"megatron|Transformer Engine|Apex|FutureWarning|UserWarning|DeprecationWarning|Traceback|"
                   r"ChildFailedError|OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|\*{5}")


def _osp_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    osp = Path(sys.executable).with_name("osp")
    cmd = [str(osp), "train", "--config", str(DEMO), "--nproc", "2", "--master-port", str(free_port()),
           f"run.dir={tmp_path / 'run'}", "run.steps=2", "run.ckpt_every=0", "data.num_workers=0", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "OMP_NUM_THREADS")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.dist
@pytest.mark.slow
def test_train_cli_quiet_run_and_one_line_errors(tmp_path):
    shards = make_shards(tmp_path / "shards", 8)
    ok = _osp_train(tmp_path, f"data.shards={shards}")
    assert ok.returncode == 0, ok.stderr
    noise = [line for line in (ok.stdout + ok.stderr).splitlines() if NOISE.search(line)]
    assert not noise, noise
    assert "checkpoint" in ok.stdout  # the run did train and save

    bad = _osp_train(tmp_path, f"data.shards={tmp_path / 'missing'}")
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    want = f"{tmp_path / 'missing'}/manifest.json: missing"
    assert sorted(line.split(":")[0] for line in lines[:2]) == ["error (rank 0)", "error (rank 1)"], lines
    assert all(want in line for line in lines[:2]), lines
    assert lines[2:] == ["error: training failed on rank 0 (exit code 1); its message is above"] or \
        lines[2:] == ["error: training failed on rank 1 (exit code 1); its message is above"], lines


def test_run_main_user_error_is_one_line_and_bug_keeps_traceback(monkeypatch, capsys):
    from osp.stage2_train import run

    def user_error(cfg, resume=""):
        raise ConfigError("data.shards: wrong folder; pass the --out of osp encode\nsecond line")

    monkeypatch.setattr(run, "Trainer", user_error)
    assert run.main(["--config", str(DEMO)]) == 1
    assert capsys.readouterr().err == "error (rank 0): data.shards: wrong folder; pass the --out of osp encode\n"

    def bug(cfg, resume=""):
        raise RuntimeError("shape mismatch in a matmul")  # not an OspError: a bug, never one line

    monkeypatch.setattr(run, "Trainer", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run.main(["--config", str(DEMO)])
    assert "error (rank" not in capsys.readouterr().err
