"""Ulysses context parallelism: CP=2, CP=4, TP=2 x CP=2 (with and without SP) equal the plain TP=1 model
on output and every gradient (one 4-process gloo launch, tests/cp_worker.py), negative controls, layout
errors, and a short TP=1 x CP=2 training (with a resume) matching TP=1 x CP=1 (tests/cp_train_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

TOL = 1e-5  # fp32, rel err = max|a - b| / max|b| per tensor (as tests/test_tp.py)
ZERO_GRAD_ABS = 1e-5
HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cp") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "cp_worker.py"), str(out)], env=ENV, capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


LAYOUTS = {
    "tp1_cp2": [1, 2, 2],
    "tp1_cp4": [1, 4, 1],
    "tp2_cp2": [2, 2, 1],
    "tp2_sp_cp2": [2, 2, 1],
    "tp2_sp_cp2_ckpt": [2, 2, 1],
}
CASES = [
    (g, lay)
    for g in ("720p_432", "odd_60")
    for lay in LAYOUTS
    if not (g == "odd_60" and lay == "tp2_cp2") and not (g == "720p_432" and lay == "tp2_sp_cp2_ckpt")
]


@pytest.mark.dist
@pytest.mark.parametrize("geometry,layout", CASES)
def test_cp_matches_tp1(results, geometry, layout):
    r = results[f"{geometry}/{layout}"]
    assert r["layout"] == LAYOUTS[layout]  # [tp, cp, dp] as megatron built it
    assert r["n"] == 57  # every parameter of the tiny DiT compared
    assert r["all_ranks_out"] < TOL, r
    assert r["all_ranks_grad"] < TOL, r
    assert r["zero_grad_abs"] < ZERO_GRAD_ABS, r


@pytest.mark.dist
def test_negative_control_without_inverse_all_to_all(results):
    """Replacing the second all-to-all by a same-shape local re-layout must break the outputs."""
    r = results["720p_432/tp1_cp2_no_inverse"]
    assert r["all_ranks_out"] > 0.01, r


@pytest.mark.dist
def test_negative_control_without_cp_grad_reduction(results):
    """Outputs stay right without the CP gradient reduction; the block gradients do not."""
    r = results["720p_432/tp1_cp2_no_grad_fix"]
    assert r["all_ranks_out"] < TOL
    assert r["all_ranks_grad"] > 0.1 and r["grad_key"].startswith("transformer_blocks."), r


# ------------------------------------------------------------------------------------------------
# layout checks (no processes)
# ------------------------------------------------------------------------------------------------
def test_layout_errors_are_one_line():
    from osp.common.errors import OspError
    from osp.stage2_train.layout import check_layout

    cases = [
        (
            dict(world=4, tp=1, sp=False, heads=24, tokens=86400, cp=3),
            "world size 4 is not divisible by parallel.tp x parallel.cp = 1 x 3",
        ),
        (dict(world=8, tp=2, sp=True, heads=6, tokens=96, cp=4), "2 x 4 must divide the DiT's 6 attention heads"),
        (
            dict(world=4, tp=2, sp=True, heads=24, tokens=90, cp=2),
            "90 video tokens per sample (T*H/2*W/2) over cp x tp = 2 x 2",
        ),
        (dict(world=2, tp=1, sp=False, heads=24, tokens=45, cp=2), "over cp=2 ranks"),
    ]
    for kw, msg in cases:
        with pytest.raises(OspError, match=None) as e:
            check_layout(**kw)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    # 93x720p (86,400 tokens, 24 heads) at TP=2 x CP=4 with SP and 93x480p (28,800) at CP=8 are valid
    check_layout(world=64, tp=2, sp=True, heads=24, tokens=24 * 45 * 80, cp=4)
    check_layout(world=8, tp=1, sp=False, heads=24, tokens=24 * 30 * 40, cp=8)


def test_config_and_make_variable():
    from osp.stage2_train.config import TrainConfig

    assert TrainConfig.load(None, ["parallel.cp=4"]).parallel.cp == 4
    with pytest.raises(ValueError, match="parallel.cp must be >= 1"):
        TrainConfig.load(None, ["parallel.cp=0"])
    make = subprocess.run(
        ["make", "-n", "train", "CP=2", "TP=2"], cwd=HERE.parent, capture_output=True, text=True, env=ENV
    )
    assert "--cp 2" in make.stdout and "--tp 2" in make.stdout, make.stdout + make.stderr


def test_launcher_sets_cuda_device_max_connections():
    from osp.stage2_train.launch import child_env

    assert child_env({}, "cuda")["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert child_env({}, "npu")["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in child_env({}, "cpu")
    assert (
        child_env({"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, "cuda")["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    )  # the user's value wins


# ------------------------------------------------------------------------------------------------
# training: TP=1 x CP=2 (2 processes, with a resume) vs TP=1 x CP=1 (1 process)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cp_train")
    shards = make_shards(work / "shards", 8)
    worker = str(HERE / "cp_train_worker.py")
    ref = subprocess.run(
        [sys.executable, worker, str(shards), str(work / "cp1"), "1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-4000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        worker,
        str(shards),
        str(work / "cp2"),
        "2",
    ]
    cp2 = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert cp2.returncode == 0, cp2.stderr[-4000:]
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    cmd[-2:] = [str(work / "ema"), "ema"]
    ema = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert ema.returncode == 0, ema.stderr[-4000:]
    out = {"cp1": json.loads((work / "cp1" / "result-rank0.json").read_text())}
    for r in range(2):
        out[f"cp2_rank{r}"] = json.loads((work / "cp2" / f"result-rank{r}.json").read_text())
        out[f"ema_rank{r}"] = json.loads((work / "ema" / f"result-rank{r}.json").read_text())
    return out


@pytest.mark.dist
def test_cp2_training_matches_cp1(training):
    ref = training["cp1"]["full"]
    for r in range(2):
        got = training[f"cp2_rank{r}"]
        assert got["layout"] == {"tp": 1, "cp": 2, "dp": 1, "cp_rank": r}
        assert got["full"]["keys"] == ref["keys"]  # both CP ranks read the same batches as CP=1
        for a, b in zip(got["full"]["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-4 * abs(b), (got["full"]["losses"], ref["losses"])
        for a, b in zip(got["full"]["grad_norms"], ref["grad_norms"]):
            assert abs(a - b) <= 1e-4 * abs(b), (got["full"]["grad_norms"], ref["grad_norms"])


@pytest.mark.dist
def test_dp_sharded_ema(training):
    """DP=2: each rank keeps about half the fp32 EMA, equal to an unsharded EMA; the checkpoint gathers it
    and a resume gives every rank its shard back."""
    for r in range(2):
        e = training[f"ema_rank{r}"]
        assert e["dp"] == 2 and e["owned_equal"] and e["resumed_equal"] and e["resumed_updates"] == 3, e
        assert 0.3 < e["owned"] / e["total"] < 0.7, e
    assert training["ema_rank0"]["gathered_equal"] is True
    assert "gathered_equal" not in training["ema_rank1"]


@pytest.mark.dist
def test_cp2_resume_matches_uninterrupted(training):
    for r in range(2):
        got = training[f"cp2_rank{r}"]
        assert got["resumed"]["losses"] == got["full"]["losses"][got["resumed"]["from"] :], got


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp1_cp2", "tp2_cp2", "tp2_sp_cp2"])
def test_collective_bytes_model_is_exact(results, layout):
    """osp.stage2_train.comm_volume (used by bench/scaleout.py at real sizes) equals, byte for byte, the
    collectives megatron and osp issue in one real step, on every rank."""
    r = results[f"720p_432/{layout}/bytes"]
    for counted in r["counted"]:
        assert counted == r["model"], (counted, r["model"])
