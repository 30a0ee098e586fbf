"""Losing a node, with real launches on localhost (CPU, gloo, tiny DiT, 2 processes per "node").

A fixed 2-node job whose node 1 is killed: node 0's ranks stop within 10 s with one line naming node 1
and nothing of node 0 keeps running. An elastic 1:2 job whose node 1 is killed after its first
checkpoint continues on node 0 alone and finishes: after the restart it reads the samples and computes
the losses of the uninterrupted 2-node run. A node that joins an elastic run is taken in at the next
checkpoint-restart. Plus the config and launch checks that need no processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.common.errors import ConfigError  # noqa: E402
from osp.stage2_train.config import TrainConfig  # noqa: E402
from osp.stage2_train.elastic import check_elastic, is_peer_failure  # noqa: E402
from osp.stage2_train.launch import resume_command  # noqa: E402

ROOT = Path(__file__).parent.parent
PY = sys.executable
OSP = str(Path(PY).with_name("osp"))
DEMO = str(ROOT / "stage2_train" / "configs" / "demo.toml")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("elastic") / "tiny", 8)


def _run_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        DEMO,
        f"data.shards={shards}",
        f"run.dir={run}",
        "data.num_workers=1",
        "run.log_every=0",
        "run.tensorboard=false",
        "parallel.init_timeout_s=60",
        *extra,
    ]


def _launch(nnodes: str, node_rank: int, port: int, run_args: list[str], log: Path) -> subprocess.Popen:
    cmd = [OSP, "train", "--nnodes", nnodes, "--node-rank", str(node_rank), "--nproc", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), *run_args]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(
            cmd, env=ENV, stdout=out, stderr=err, start_new_session=True
        )  # the child keeps its copies


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until something accepts connections on 127.0.0.1:port (the rendezvous store of `proc`'s node)."""
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the node hosting the rendezvous ended early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def _steps(run: Path) -> list[dict]:
    return [m for m in _records(run) if "event" not in m]


def _wait_for(cond, procs: list[subprocess.Popen], timeout: float = 240, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        for p in procs:
            assert p.poll() is None, f"{what}: a launcher exited early ({p.returncode}): {Path(p.args[-1])}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _tree(proc: subprocess.Popen) -> list:
    import psutil

    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _kill_node(proc: subprocess.Popen) -> None:
    """The whole node dies at once: launcher, torchrun's agent, ranks and loader workers (SIGKILL)."""
    import psutil

    for p in _tree(proc):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------
# no processes
# ------------------------------------------------------------------------------------------------
def test_nnodes_min_max_config_and_refusals():
    cfg = TrainConfig.load(DEMO, ["launch.nnodes=1:2"], {"launch.nproc": 2})
    assert (cfg.launch.min_nodes, cfg.launch.nnodes, cfg.world) == (1, 2, 4)
    assert TrainConfig.from_dict(__import__("tomllib").loads(cfg.to_toml())) == cfg  # the resolved config round-trips
    flag = TrainConfig.load(DEMO, flags={"launch.nnodes": "2", "launch.nproc": 2})
    assert (flag.launch.min_nodes, flag.launch.nnodes) == (0, 2)
    check_elastic(cfg)  # 2 processes per node hold one TP=2 group; global batch 4 = 2 x 1 x 2 = 2 x 2 x 1
    with pytest.raises(ConfigError, match="MIN must be in"):
        TrainConfig.load(DEMO, ["launch.nnodes=3:2"])
    with pytest.raises(ConfigError, match="must be a number of nodes or MIN:MAX"):
        TrainConfig.load(DEMO, ["launch.nnodes=1:x"])
    # MIN (any node) cannot hold one TP x CP group: 3 processes per node, TP=2
    odd = TrainConfig.load(DEMO, ["launch.nnodes=1:2"], {"launch.nproc": 3})
    with pytest.raises(ConfigError, match="do not hold whole TP x CP groups") as e:
        check_elastic(odd)
    assert "\n" not in str(e.value)
    # 2:3 nodes: the global batch of 3 nodes (2 x 1 x 3) is no whole number of micro-batches on 2 nodes
    three = TrainConfig.load(DEMO, ["launch.nnodes=2:3"], {"launch.nproc": 2})
    with pytest.raises(ConfigError, match="on 2 nodes; set optim.grad_accum to a multiple of 2"):
        check_elastic(three)
    check_elastic(TrainConfig.load(DEMO, ["launch.nnodes=2:3", "optim.grad_accum=2"], {"launch.nproc": 2}))


def test_peer_failures_are_told_from_bugs_and_resume_command():
    gloo = RuntimeError(
        "Got the following error when running the callback: RuntimeError: [/pytorch/third_party/gloo/gloo/"
        "transport/tcp/pair.cc:537] Read error [127.0.0.1]:44228: Connection reset by peer. This is typically caused "
        "by a remote worker hanging"
    )
    assert is_peer_failure(gloo) == "Read error [127.0.0.1]:44228: Connection reset by peer"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = RuntimeError("[pair.cc:598] Connection closed by peer [127.0.0.1]:1234")
    assert is_peer_failure(wrapped) == "Connection closed by peer [127.0.0.1]:1234"
    assert is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    argv = ["/x/bin/osp", "train", "--config", "c.toml", "--restart", "--resume", "x", "run.resume=y", "run.steps=5"]
    assert resume_command(argv) == "osp train --config c.toml run.steps=5 --resume auto"


# ------------------------------------------------------------------------------------------------
# a fixed 2-node job loses node 1
# ------------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_lost_node_is_one_line_on_every_surviving_rank(shards, tmp_path):
    import psutil

    run, port = tmp_path / "run", free_port()
    args = _run_args(shards, run, "run.steps=200", "run.ckpt_every=2")
    node1 = _launch("2", 1, port, args, tmp_path / "node1")
    node0 = _launch("2", 0, port, args, tmp_path / "node0")
    _wait_for(lambda: len(_steps(run)) >= 4, [node0, node1], what="step 4")
    survivors = _tree(node0)
    assert len(survivors) >= 4  # launcher, agent, 2 ranks (+ loader workers)
    t0 = time.time()
    _kill_node(node1)
    node0.wait(timeout=60)
    took = time.time() - t0
    _, alive = psutil.wait_procs(survivors, timeout=1)
    assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
    assert took < 10, took
    err = (tmp_path / "node0.err").read_text()
    assert node0.returncode != 0, err[-3000:]
    assert "Traceback" not in err and "GLHF" not in err and "typically caused" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    ranks = [x for x in lines if x.startswith("error (rank")]
    assert sorted(x.split(")")[0] for x in ranks) == ["error (rank 0", "error (rank 1"], err[-3000:]
    for line in ranks:
        assert "node 1 (ranks 2, 3) stopped answering" in line and "of step" in line, line
        assert "--resume auto` on every node" in line and f"--master-port {port}" in line, line
    assert len(lines) == 3 and lines[-1].startswith("error: node 1 (ranks 2, 3)"), err[-3000:]


# ------------------------------------------------------------------------------------------------
# checkpoint cadence by time: rank 0's clock, agreed by every rank in the step's flags all-reduce
# ------------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_ckpt_every_minutes_saves_on_rank0s_clock(shards, tmp_path):
    def saved_steps(minutes: str, run: Path) -> list[int]:
        cmd = [OSP, "train", "--nproc", "2", *_run_args(shards, run, "run.steps=4", "run.ckpt_every=0")]
        p = subprocess.run(
            cmd + [f"run.ckpt_every_minutes={minutes}"], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return [int(x.split("step-")[1][:7]) for x in p.stdout.splitlines() if x.startswith("checkpoint ")]

    assert saved_steps("0.0001", tmp_path / "often") == [1, 2, 3, 4]  # 6 ms: due after every step
    assert saved_steps("60", tmp_path / "hourly") == [4]  # control: not due within the run, only the final save


# ------------------------------------------------------------------------------------------------
# elastic: continue on the node that remains; take in a node that joins
# ------------------------------------------------------------------------------------------------
STEPS = 8
ELASTIC = ("launch.join_wait_s=3", "run.log_keys=true", f"run.steps={STEPS}", "run.ckpt_every=2")


def _keys(run: Path, rank: int, *, last_start: bool = False) -> dict[int, list[str]]:
    """Step -> keys of one rank's keys file; `last_start`: only what the last start of the ranks wrote
    (the file goes on across restarts: a start that resumes begins again below the steps it has)."""
    rows = [json.loads(x) for x in (run / f"keys-rank{rank:05d}.jsonl").read_text().splitlines()]
    if last_start:
        cut = max([i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]], default=0)
        rows = rows[cut:]
    return {r["step"]: r["keys"] for r in rows}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-node run (fixed NNODES=2, 2 processes per node, TP=2 in a node, DP=2)."""
    work = tmp_path_factory.mktemp("reference")
    run, port = work / "run", free_port()
    nodes = [_launch("2", r, port, _run_args(shards, run, *ELASTIC), work / f"node{r}") for r in (1, 0)]
    for n in nodes:
        n.wait(timeout=400)
    assert [n.returncode for n in nodes] == [0, 0], (work / "node0.err").read_text()[-3000:]
    return run


@pytest.mark.dist
@pytest.mark.slow
def test_elastic_job_continues_on_the_remaining_node(shards, reference, tmp_path):
    run, port = tmp_path / "run", free_port()
    args = _run_args(shards, run, *ELASTIC)
    node0 = _launch("1:2", 0, port, args, tmp_path / "node0")
    _wait_listening(port, node0)  # node 0 hosts the rendezvous store (the MASTER_ADDR node must stay up)
    node1 = _launch("1:2", 1, port, args, tmp_path / "node1")
    latest = run / "checkpoints" / "latest"

    def running_on_both() -> bool:  # (a node that came late was taken in by a restart: then its first checkpoint)
        ev = [e for e in _records(run) if e.get("event")]
        return bool(ev) and ev[-1]["world"] == 4 and latest.exists() and ev[-1]["step"] < int(latest.read_text()[5:])

    _wait_for(running_on_both, [node0, node1], what="the first checkpoint on both nodes")
    before = len([e for e in _records(run) if e.get("event")])
    _kill_node(node1)
    node0.wait(timeout=400)
    out, err = (tmp_path / "node0.out").read_text(), (tmp_path / "node0.err").read_text()
    assert node0.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "GLHF" not in err, err[-3000:]
    lost = [x for x in err.splitlines() if x.startswith("error (rank")]
    assert lost and all("node 1 (" in x and "torchrun restarts the job" in x for x in lost), err[-3000:]

    rec = _records(run)
    at = [i for i, e in enumerate(rec) if e.get("event") == "elastic_start"]
    assert len(at) == before + 1, rec
    again = rec[at[-1]]
    resumed = again["step"]
    assert 2 <= resumed < STEPS and again["resumed_from"] == f"step-{resumed:07d}", again
    assert (again["nodes"], again["world"], again["dp"], again["grad_accum"], again["global_batch"]) == (1, 2, 1, 2, 4)
    assert again["previous"] == {"nodes": 2, "world": 4, "dp": 2, "grad_accum": 1}, again
    reached = max(m["step"] for m in rec[: at[-1]] if "event" not in m)
    assert again["steps_lost"] == reached - resumed, (again, reached)
    assert f"elastic restart {len(at) - 1}: 2 -> 1 node(s), world 4 -> 2, DP 2 -> 1, optim.grad_accum 1 -> 2" in out

    # after the restart: the samples and the losses of the uninterrupted 2-node run, step by step
    after = _keys(run, 0, last_start=True)
    assert sorted(s for s in after if s > resumed) == list(range(resumed + 1, STEPS + 1))
    ref0, ref2 = _keys(reference, 0), _keys(reference, 2)  # the two DP ranks (TP groups [0, 1] and [2, 3])
    for s in range(resumed + 1, STEPS + 1):
        assert after[s] == ref0[s] + ref2[s], (s, after[s], ref0[s], ref2[s])  # DP 2 x 1 = 1 x 2 micro-batches
        assert _keys(run, 1, last_start=True)[s] == after[s]  # its TP peer reads the same batch
    mine = {m["step"]: m["loss"] for m in rec[at[-1] + 1 :]}
    ref = {m["step"]: m["loss"] for m in _steps(reference)}
    assert sorted(mine) == list(range(resumed + 1, STEPS + 1))
    for s in mine:
        assert mine[s] == pytest.approx(ref[s], rel=1e-5), (s, mine[s], ref[s])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:07d}"


@pytest.mark.dist
@pytest.mark.slow
def test_a_node_that_joins_is_taken_in_at_a_checkpoint_restart(shards, tmp_path):
    import signal

    run, port = tmp_path / "run", free_port()
    args = _run_args(shards, run, "launch.join_wait_s=2", "run.steps=100000", "run.ckpt_every=0")
    node0 = _launch("1:2", 0, port, args, tmp_path / "node0")
    _wait_for(lambda: len(_steps(run)) >= 2, [node0], what="2 steps on one node")
    node1 = _launch("1:2", 1, port, args, tmp_path / "node1")

    def joined() -> bool:
        rec = _records(run)
        at = [i for i, e in enumerate(rec) if e.get("event")]
        return len(at) == 2 and len(rec) - at[1] > 2

    _wait_for(joined, [node0, node1], what="a restart with both nodes and 2 steps after it")
    for n in (node0, node1):  # a scheduler's stop: every process of both nodes
        for p in _tree(n):
            p.send_signal(signal.SIGTERM)
    for n in (node0, node1):
        n.wait(timeout=120)
    errs = [(tmp_path / f"node{r}.err").read_text() for r in (0, 1)]
    assert [node0.returncode, node1.returncode] == [0, 0], [e[-2000:] for e in errs]
    events = [e for e in _records(run) if e.get("event") == "elastic_start"]
    one, two = events[0], events[1]
    assert (one["world"], one["dp"], one["grad_accum"], one["resumed_from"]) == (2, 1, 2, None), one
    assert (two["world"], two["dp"], two["grad_accum"], two["global_batch"]) == (4, 2, 1, 4), two
    # node 0's ranks wrote a checkpoint when torchrun stopped them for the new node: nothing was lost
    assert two["resumed_from"] == f"step-{two['step']:07d}" and two["steps_lost"] == 0, two
    assert two["previous"] == {"nodes": 1, "world": 2, "dp": 1, "grad_accum": 2}, two
