"""Data parallelism from the library (stage2_train/data_parallel.py: torch DDP + ZeroRedundancyOptimizer):
DP=2 equals DP=1 with twice the batch (one 2-process gloo launch, tests/ddp_worker.py), with a negative
control, bucketed reduction during backward only on the final micro-step, sharded AdamW state and an
exact resume of the owned state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
GRAD_TOL, PARAM_TOL = 1e-5, 1e-4  # fp32; params: AdamW divides by sqrt(v), amplifying rounding of small grads
POSITIVE = ["zero1_overlap", "zero1_blocking", "replicated_overlap"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), str(out)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("case", POSITIVE)
def test_dp2_library_optimizer_equals_dp1_with_twice_the_batch(results, case):
    for r in results[case]:  # both ranks
        assert r["grad"] < GRAD_TOL and r["param"] < PARAM_TOL, (r["grad"], r["param"])
        assert r["null"] and r["null_grad"] < 1e-7 and r["null_param"] < 1e-2  # the analytically zero key-bias grads


@pytest.mark.dist
def test_negative_control_without_the_reduction_fails(results):
    for r in results["no_reduction"]:
        assert r["buckets"] == [0, 0, 0]
        assert r["grad"] > 0.1 and r["param"] > 10 * PARAM_TOL, (r["grad"], r["param"])


@pytest.mark.dist
def test_reduction_is_bucketed_inside_backward_and_only_on_the_final_micro_step(results):
    r = results["zero1_overlap"][0]
    # DDP rebuilds its buckets in gradient-ready order after the first step; 20 KiB buckets -> many
    assert all(b > 1 for b in r["buckets"][1:]), r["buckets"]
    per_micro = r["during_backward"]  # buckets launched before the input's grad (the end of backward)
    assert per_micro[0::2] == [0, 0, 0]  # micro-step 1 of 2: no_sync, nothing reduced
    assert per_micro[1::2] == r["buckets"]  # micro-step 2: every bucket went out during backward
    assert results["replicated_overlap"][0]["buckets"][1:] == [1, 1]  # 25 MiB: the tiny model fits one bucket


@pytest.mark.dist
def test_zero_shards_the_adam_state_and_resumes_it_exactly(results):
    z0, z1 = results["zero1_overlap"]
    names = set(z0["all_names"])
    assert z0["zero"] and set(z0["owned"]).isdisjoint(z1["owned"]) and set(z0["owned"]) | set(z1["owned"]) == names
    assert z0["owned"] and z1["owned"]
    p0, p1 = results["replicated_overlap"]
    assert not p0["zero"] and set(p0["owned"]) == set(p1["owned"]) == names
    assert z0["state_numel"] + z1["state_numel"] == p0["state_numel"]
    assert max(z0["state_numel"], z1["state_numel"]) < 0.6 * p0["state_numel"]
    for case in POSITIVE:
        assert all(r["resume_equal"] for r in results[case]), case


def test_bucket_size_must_be_positive():
    from osp.stage2_train.config import TrainConfig

    with pytest.raises(ValueError, match="parallel.bucket_mb"):
        TrainConfig.from_dict({"parallel": {"bucket_mb": 0}})


# ------------------------------------------------------------------------------------------------
# the Trainer at DP=2: ZeRO AdamW + gradient accumulation, resumed bit-exactly, blocking == overlapped
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict:
    sys.path.insert(0, str(HERE))
    from train_helpers import free_port, make_shards

    work = tmp_path_factory.mktemp("ddp_train")
    shards = make_shards(work / "shards", 8)
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
        str(HERE / "ddp_train_worker.py"),
        str(shards),
        str(work / "out"),
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: json.loads((work / "out" / f"result-rank{r}.json").read_text()) for r in range(2)}


@pytest.mark.dist
def test_trainer_dp2_zero_resume_is_bit_exact_and_overlap_changes_no_number(training):
    for r in range(2):
        got = training[r]
        full = got["full"]
        assert full["dp"] == 2 and full["zero"] and full["buckets"] > 4  # 4 steps, several buckets each
        assert got["resumed"]["from"] == 2 and got["resumed"]["losses"] == full["losses"][2:], got
        assert got["resumed"]["grad_norms"] == full["grad_norms"][2:], got
        assert got["blocking"]["losses"] == full["losses"] and got["blocking"]["grad_norms"] == full["grad_norms"], got
    assert training[0]["full"]["losses"] == training[1]["full"]["losses"]  # the logged loss is the DP mean
