"""What a user sees: a normal run prints no third-party noise, a user error is one line per rank (plus
one launcher line, no torchrun traceback block), a bug keeps its traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.common.errors import ConfigError  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "stage2_train" / "configs" / "demo.toml"
NOISE = re.compile(
    r"megatron|Transformer Engine|Apex|FutureWarning|UserWarning|DeprecationWarning|Traceback|"
    r"ChildFailedError|OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|\*{5}"
)


def _osp_train(tmp_path: Path, *overrides: str, run: str = "run") -> subprocess.CompletedProcess:
    osp = Path(sys.executable).with_name("osp")
    cmd = [
        str(osp),
        "train",
        "--config",
        str(DEMO),
        "--nproc",
        "2",
        "--master-port",
        str(free_port()),
        f"run.dir={tmp_path / run}",
        "run.steps=2",
        "run.ckpt_every=0",
        "data.num_workers=0",
        *overrides,
    ]
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

    bad = _osp_train(tmp_path, f"data.shards={tmp_path / 'missing'}", run="bad")
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    want = f"{tmp_path / 'missing'}/manifest.json: missing"
    # each rank that got to report says one line (torchrun may stop the slower rank first), then the
    # launcher's one line names a rank that failed with the error's exit code (no torchrun traceback)
    assert 2 <= len(lines) <= 3, lines
    assert all(re.match(r"error \(rank [01]\): ", line) and want in line for line in lines[:-1]), lines
    assert re.fullmatch(
        r"error: rank [01] failed first \(exit code 1; its error is above\); torchrun stopped the other ranks",
        lines[-1],
    ), lines


def test_run_main_user_error_is_one_line_and_bug_keeps_traceback(monkeypatch, capsys, tmp_path):
    from osp.stage2_train import run
    from osp.stage2_train.config import TrainConfig

    cfg = TrainConfig.load(DEMO, [f"run.dir={tmp_path / 'run'}"])

    def user_error(cfg, resume=""):
        raise ConfigError("data.shards: wrong folder; pass the --out of osp encode\nsecond line")

    monkeypatch.setattr(run, "build_trainer", user_error)
    assert run.main(cfg) == 1
    assert capsys.readouterr().err == "error (rank 0): data.shards: wrong folder; pass the --out of osp encode\n"

    def bug(cfg, resume=""):
        raise RuntimeError("shape mismatch in a matmul")  # not an OspError: a bug, never one line

    monkeypatch.setattr(run, "build_trainer", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run.main(cfg)
    assert "error (rank" not in capsys.readouterr().err


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_quiet_filters_are_narrow(device_type):
    import warnings

    from osp.common.quiet import quiet_device_warnings, quiet_third_party_warnings

    cuda_hint = (
        "When using sequence parallelism it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        quiet_device_warnings(device_type)
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning, stacklevel=1
        )
        warnings.warn(cuda_hint, UserWarning, stacklevel=1)
        warnings.warn("a library warning osp does not know", UserWarning, stacklevel=1)
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning, stacklevel=1
        )  # other category
    shown = [str(w.message) for w in caught]
    expected = ([cuda_hint] if device_type == "cuda" else []) + [
        "a library warning osp does not know",
        "`torch.distributed.all_gather_into_tensor` is deprecated",
    ]
    assert shown == expected


def test_encode_checks_weight_folders_before_planning(tmp_path):
    from typer.testing import CliRunner

    from osp.common.cli import app

    # --data does not exist either: the weight folders are checked first (seconds), the dataset after
    res = CliRunner().invoke(
        app,
        [
            "encode",
            "--data",
            str(tmp_path / "no-data"),
            "--out",
            str(tmp_path / "out"),
            "--vae",
            str(tmp_path / "no-vae"),
            "--text-encoder",
            str(tmp_path / "no-te"),
        ],
    )
    assert res.exit_code == 1, res.output
    assert f"{tmp_path / 'no-vae'}: no such VAE folder" in res.output
    assert not (tmp_path / "out").exists()


def test_preset_and_scheduler_are_choices():
    from typer.testing import CliRunner

    from osp.common.cli import app

    res = CliRunner().invoke(app, ["encode", "--data", "d", "--out", "o", "--preset", "osp12-93x48p"])
    assert res.exit_code == 2 and "osp12-93x480p" in res.output  # refused by the parser, the choices listed
    res = CliRunner().invoke(app, ["sample", "--checkpoint", "c", "--prompt", "p", "--scheduler", "euler_a"])
    assert res.exit_code == 2 and "euler-ancestral" in res.output
    from osp.common.sampling import make_scheduler  # library callers get the same check as an OspError

    with pytest.raises(ConfigError, match="unknown scheduler 'euler_a'"):
        make_scheduler("euler_a")


class _BadSample(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ConfigError("shards/x/shard-000000.tar: sample 'k1' is corrupt; re-encode that shard")


def test_one_line_of_an_error_from_a_dataloader_worker():
    """A user error raised in a DataLoader worker keeps its class and its own message as the one line."""
    from torch.utils.data import DataLoader

    from osp.common.errors import one_line

    with pytest.raises(ConfigError) as e:
        next(iter(DataLoader(_BadSample(), batch_size=None, num_workers=1)))
    assert str(e.value).startswith("Caught ConfigError in DataLoader worker")
    assert one_line(e.value) == "shards/x/shard-000000.tar: sample 'k1' is corrupt; re-encode that shard"
    assert one_line(ConfigError("first\nsecond")) == "first" and one_line(ConfigError("")) == "ConfigError"
