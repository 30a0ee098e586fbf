"""Training checkpoints (torch DCP): resume on another layout, kill -9 during an async save, slice reads.

Launch budget: one 2-process and one 4-process torchrun (tests/ckpt_worker.py), three 1-process runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.stage2_train.state_dict_adapter import SliceReader, save_dit_checkpoint, shard_tensor, split_state_dict  # noqa: E402
from osp.common.models.dit import build_dit  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SRC_STEPS, MORE = 6, 3


def read_all(path: Path, skip: tuple[str, ...] = ("rng.",)) -> dict[str, torch.Tensor]:
    """Every global tensor of a DCP checkpoint, assembled offline (no process group)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items() if not k.startswith(skip)}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def _torchrun(nproc: int, shards: Path, out: Path, names: str) -> None:
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(HERE / "ckpt_worker.py"),
        str(shards),
        str(out),
        names,
    ]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> dict:
    shards = make_shards(tmp_path_factory.mktemp("shards") / "tiny", 8)
    out = tmp_path_factory.mktemp("reshard")
    _torchrun(2, shards, out, "src,tp1dp2,tp1dp2_ref")  # TP=2+SP DP=1 -> TP=1 DP=2
    _torchrun(4, shards, out, "tp2dp2z,tp2dp2z_ref")  # -> TP=2 DP=2 ZeRO-1
    res = {}
    for f in out.glob("*-rank*.json"):
        name, rank = f.stem.rsplit("-rank", 1)
        res.setdefault(name, {})[int(rank)] = json.loads(f.read_text())
    res["out"] = out
    return res


def _step_keys(ranks: dict, dp: int) -> list[list[str]]:
    """Per step, the global batch's keys in (dp rank, position) order (one TP rank per DP rank)."""
    by_dp = {r["dp_rank"]: r["keys"] for r in ranks.values() if r["tp_rank"] == 0}
    assert sorted(by_dp) == list(range(dp))
    return [sum((by_dp[d][s] for d in range(dp)), []) for s in range(len(by_dp[0]))]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("new", ["tp1dp2", "tp2dp2z"])
def test_resume_on_another_layout(resharded, new):
    src, res, ref = resharded["src"], resharded[new], resharded[f"{new}_ref"]
    out = resharded["out"]
    for r in res.values():  # the loaded model and EMA, gathered, equal the saved global tensors bit for bit
        assert r["checks"] == {"model_equal": True, "ema_equal": True}, r
        assert r["start_step"] == SRC_STEPS and r["loader"]["samples"] == 4 and r["loader"]["epoch"] == 1
    # the whole state (model, EMA, every AdamW moment and step, counters) re-saved right after the
    # resume at the new layout equals the saved one exactly
    saved = read_all(out / "src" / "checkpoints" / f"step-{SRC_STEPS:07d}")
    again = read_all(out / new / "checkpoints" / f"step-{SRC_STEPS:07d}")
    assert saved.keys() == again.keys()
    n_params = sum(k.startswith("model.") for k in saved)
    assert sum(k.startswith("optim.exp_avg.") for k in saved) == n_params  # every moment written once (ZeRO owners)
    for k in saved:
        assert saved[k].dtype == again[k].dtype and torch.equal(saved[k], again[k]), k
    # the next losses equal the uninterrupted run at the new layout (fp32 tolerance: other reduction orders)
    ref_losses = ref[0]["losses"]
    np.testing.assert_allclose(res[0]["losses"], ref_losses[SRC_STEPS:], rtol=1e-5)
    np.testing.assert_allclose(src[0]["losses"], ref_losses[:SRC_STEPS], rtol=1e-5)
    # data order (4 steps per epoch of 8 samples): the resumed steps read exactly the
    # samples the uninterrupted run reads, none repeated, none skipped
    dp = res[0]["dp"]
    resumed = _step_keys(src, 1) + _step_keys(res, dp)
    assert resumed == _step_keys(ref, dp)
    epoch1 = sum(resumed[4:8], [])
    assert sorted(epoch1) == sorted(set(epoch1)) and len(epoch1) == 8


# ------------------------------------------------------------------------------------------------
# kill -9 during an asynchronous save
# ------------------------------------------------------------------------------------------------
def _run(run: Path, shards: Path, steps: int, env: dict | None = None) -> subprocess.Popen:
    cmd = [
        str(Path(PY).with_name("osp")),
        "train",
        "--config",
        str(ROOT / "stage2_train" / "configs" / "demo.toml"),
        "--resume",
        "auto",
        f"data.shards={shards}",
        f"run.dir={run}",
        f"run.steps={steps}",
        "run.ckpt_every=2",
        "data.num_workers=0",
        "run.log_every=0",
        "run.tensorboard=false",
        "parallel.tp=1",
        "parallel.sp=false",
        "run.async_ckpt=true",
    ]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.slow
def test_kill9_during_async_save_keeps_the_previous_latest(tmp_path):
    shards = make_shards(tmp_path / "shards", 8)
    run = tmp_path / "run"
    ckroot = run / "checkpoints"
    p = _run(run, shards, 2)
    out = p.communicate(timeout=200)  # (communicate, not wait: it also closes the pipes)
    assert p.returncode == 0, out[1][-3000:]
    assert (ckroot / "latest").read_text().strip() == "step-0000002"

    # the save at step 4 sleeps before writing its data; training goes on meanwhile; kill -9 at step 5
    p = _run(run, shards, 8, {"OSP_TEST_SLOW_SAVE_S": "300"})
    deadline = time.time() + 200
    while not any(m["step"] == 5 for m in _metrics(run)):
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert (ckroot / "latest").read_text().strip() == "step-0000002"
    assert (ckroot / ".tmp-step-0000004").is_dir() and not (ckroot / "step-0000004").exists()
    killed = {m["step"]: m["loss"] for m in _metrics(run)}

    p = _run(run, shards, 6)
    out = p.communicate(timeout=300)
    assert p.returncode == 0, out[1][-3000:]
    assert "resuming from" in out[0] and "step-0000002" in out[0]
    assert (ckroot / "latest").read_text().strip() == "step-0000006" and not (ckroot / ".tmp-step-0000004").exists()
    after = _metrics(run)[-4:]
    assert [m["step"] for m in after] == [3, 4, 5, 6]
    for m in after[:3]:  # steps redone after the kill are bit-identical to the first attempt
        assert m["loss"] == killed[m["step"]], (m, killed[m["step"]])

    # `osp convert export` reads the training checkpoint (EMA by default) into the diffusers layout
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from osp.common.cli import app

    r = CliRunner().invoke(app, ["convert", "export", str(ckroot / "step-0000006"), str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    exported = load_file(str(tmp_path / "export" / "diffusion_pytorch_model.safetensors"))
    saved = read_all(ckroot / "step-0000006")
    assert exported.keys() == {k[4:] for k in saved if k.startswith("ema.")}
    assert all(torch.equal(v, saved[f"ema.{k}"]) for k, v in exported.items())
    assert not all(torch.equal(v, saved[f"model.{k}"]) for k, v in exported.items())  # the EMA, not the weights
    # `osp convert merge` turns it into an osp-dit checkpoint (weights and EMA)
    from osp.stage2_train.checkpoint import load_dit_checkpoint

    r = CliRunner().invoke(app, ["convert", "merge", str(ckroot / "step-0000006"), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    for ema in (False, True):
        _, sd = load_dit_checkpoint(tmp_path / "merged", prefer_ema=ema)
        assert all(torch.equal(v, saved[f"{'ema' if ema else 'model'}.{k}"]) for k, v in sd.items())


# ------------------------------------------------------------------------------------------------
# slice reads of released / osp-dit safetensors (no processes)
# ------------------------------------------------------------------------------------------------
def test_slice_reader_reads_each_tp_piece_from_any_saved_tp(tmp_path):
    torch.manual_seed(0)
    dit = build_dit("tiny")
    full = dit.state_dict()
    save_dit_checkpoint(
        tmp_path / "tp2",
        split_state_dict(full, 2),
        dit.config,
        ema_per_rank=split_state_dict({k: v + 1 for k, v in full.items()}, 2),
    )
    save_dit_checkpoint(tmp_path / "tp1", [full], dit.config)
    for folder, ema in ((tmp_path / "tp2", False), (tmp_path / "tp1", False), (tmp_path / "tp2", True)):
        reader = SliceReader(folder, prefer_ema=ema)
        assert reader.keys() == set(full)
        for tp in (1, 2):
            for rank in range(tp):
                for k, v in full.items():
                    want = shard_tensor(k, v + 1 if ema else v, tp, rank)
                    assert torch.equal(reader.read(k, tp, rank), want), (folder, tp, rank, k)
    k = "transformer_blocks.0.attn1.to_out.0.weight"  # row-parallel: a column slice
    assert SliceReader(tmp_path / "tp2").shape(k) == tuple(full[k].shape)
