"""Reliability under faults, with real processes and bounded time.

Training: a corrupt sample with loader workers on 2 ranks stops every rank naming the key; kill -9 of
the launcher leaves no rank alive; SIGTERM checkpoints and exits 0; a second job on a locked run
directory stops; a missing node / busy port fail with one line; the watchdog names rank and place.
Shards: swapped or edited index rows, damaged tar headers, removed padding, deleted sidecars and a
changed uncond fail in `verify` and in training alike. Encode faults are in test_faults_encode.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_helpers import damage, swap_rows  # noqa: E402
from train_helpers import corrupt_sample, free_port, make_shards  # noqa: E402

from osp.common import shards as S  # noqa: E402
from osp.stage2_train.data import ShardLoader  # noqa: E402
from osp.stage2_train.lock import RunLock, RunLockedError  # noqa: E402

ROOT = Path(__file__).parent.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "stage2_train" / "configs" / "demo.toml"),
        f"data.shards={shards}",
        f"run.dir={run}",
        "run.log_every=0",
        "run.tensorboard=false",
        "parallel.tp=1",
        "parallel.sp=false",
        "data.num_workers=1",
        *extra,
    ]


OSP = str(Path(PY).with_name("osp"))
DEMO = str(ROOT / "stage2_train" / "configs" / "demo.toml")


def _launch(run_args: list[str], *launch: str, port: int | None = None) -> subprocess.Popen:
    cmd = [OSP, "train", "--nproc", "2", "--master-port", str(port or free_port()), *launch, *run_args]
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    f = run / "metrics.jsonl"
    while time.time() < deadline:
        if f.exists() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines() if x.strip()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("faults") / "tiny", 8)


# ------------------------------------------------------------------------------------------------
# integrity: verify and training agree on every damage kind
# ------------------------------------------------------------------------------------------------
DAMAGES = ["swap_rows", "edit_shape", "flip_tar_header", "strip_padding", "delete_sidecar", "flip_byte", "truncate"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damage_fails_verify_and_training_alike(shards, tmp_path, kind):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    assert S.verify(out) == []
    damaged_keys = damage(out, kind)
    problems = S.verify(out)
    assert problems and any(
        k in " ".join(problems) or kind in ("strip_padding", "delete_sidecar", "truncate") for k in damaged_keys
    ), problems
    loader = ShardLoader(out, batch_size=1, dp_rank=0, dp_size=1, seed=0, num_workers=0, skip_corrupt=True)
    seen = set()
    for _ in range(len(loader.rows)):
        b = next(loader)
        seen |= {s["key"] for s in b.skipped}
    assert set(damaged_keys) <= seen, (kind, damaged_keys, seen)
    if kind == "edit_shape":  # training on the video shape only: the edited row is checked, not dropped
        from osp.stage2_train.data import CorruptSampleError

        with pytest.raises(CorruptSampleError, match=damaged_keys[0]):
            ShardLoader(out, batch_size=1, dp_rank=0, dp_size=1, seed=0, shapes={(3, 6, 8)})


def test_swapped_rows_caught_by_training_and_negative_control(shards, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    ok = ShardLoader(out, batch_size=2, dp_rank=0, dp_size=1, seed=0, num_workers=0)
    assert all(not next(ok).skipped for _ in range(4))  # negative control: the intact cache reads clean
    keys = swap_rows(out, 1, 2)
    bad = ShardLoader(out, batch_size=1, dp_rank=0, dp_size=1, seed=0, num_workers=0)
    with pytest.raises(Exception, match="|".join(keys)) as e:
        for _ in range(8):
            next(bad)
    assert "skip_corrupt" in str(e.value) and "\n" not in str(e.value)


def test_uncond_pinned_by_manifest_and_old_schema_upgrade(shards, tmp_path):
    import shutil

    import torch

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    m = S.read_manifest(out)
    assert m["uncond_checksum"].startswith("crc32c:")
    # a different uncond whose bytes are valid safetensors: verify and read_uncond both refuse it
    (out / S.UNCOND_NAME).write_bytes(
        __import__("safetensors.torch", fromlist=["save"]).save({"text": torch.zeros(1, 64)})
    )
    assert any("pinned" in p for p in S.verify(out))
    with pytest.raises(S.ShardError, match="pinned in manifest.json"):
        S.read_uncond(out)
    # an oversized safetensors header is a one-line ShardError
    with pytest.raises(S.ShardError, match="over the"):
        S.load_safetensors_bytes((2**40).to_bytes(8, "little") + b"{}", "x")


def test_v1_cache_gets_one_line_error_and_upgrades(shards, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    # rewrite the cache as an older osp did: schema 1, checksums over the member bytes only
    for side_path in sorted(out.glob("shard-*.rows.json")):
        side = json.loads(side_path.read_bytes())
        tar = out / side["tar"]
        data = tar.read_bytes()
        for r in side["rows"]:
            r["checksum"] = S.checksum(
                data[r["st_offset"] : r["st_offset"] + r["st_size"]],
                data[r["json_offset"] : r["json_offset"] + r["json_size"]],
            )
        side["schema_version"] = 1
        side_path.write_text(json.dumps(side))
    m = json.loads((out / S.MANIFEST_NAME).read_text())
    m["schema_version"] = 1
    (out / S.MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(S.ShardError, match="osp shards upgrade") as e:
        S.read_manifest(out)
    assert "\n" not in str(e.value)
    r = subprocess.run(
        [str(Path(PY).parent / "osp"), "shards", "upgrade", str(out)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "8 rows upgraded" in r.stdout, r.stderr
    assert S.verify(out) == []
    idx, ref = S.ShardIndex.open(out), S.ShardIndex.open(shards)
    assert list(idx.checksum) == list(ref.checksum)  # the upgraded sums equal the ones a v2 writer computes


# ------------------------------------------------------------------------------------------------
# run lock, watchdog (in-process / tiny subprocesses)
# ------------------------------------------------------------------------------------------------
def test_run_lock_excludes_a_second_job_and_never_goes_stale(tmp_path):
    held = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    held.release()
    RunLock(tmp_path).acquire().release()
    # a holder killed with SIGKILL leaves no stale lock
    code = f"from osp.stage2_train.lock import RunLock; import os, sys; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); os.kill(os.getpid(), 9)"
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and "held" in p.stdout
    RunLock(tmp_path).acquire().release()


def test_watchdog_names_rank_and_place():
    code = (
        "from osp.stage2_train.watchdog import Watchdog; import time\n"
        "w = Watchdog(0.5, rank=3); w.beat('waiting for the data loader (step 7)'); time.sleep(30)"
    )
    t0 = time.time()
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and time.time() - t0 < 20
    line = p.stderr.strip()
    assert (
        line.count("\n") == 0
        and "rank 3" in line
        and "waiting for the data loader (step 7)" in line
        and "run.watchdog_s" in line
    )


# ------------------------------------------------------------------------------------------------
# launch faults: a missing node and a busy port fail with one line, fast
# ------------------------------------------------------------------------------------------------
def test_missing_node_and_busy_port_fail_with_one_line():
    port = free_port()
    t0 = time.time()
    p = subprocess.run(
        [
            OSP,
            "train",
            "--config",
            DEMO,
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--nproc",
            "1",
            "--master-port",
            str(port),
        ]
        + ["launch.precheck_timeout_s=3"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.time() - t0
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0, err
    assert "NODE_RANK 1 did not reach the rendezvous" in err and f"127.0.0.1:{port} within 3 s" in err, err
    assert 3 <= took < 20, took
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        p = subprocess.run(
            [OSP, "train", "--config", DEMO, "--nproc", "2", "--master-port", str(port)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0 and f"MASTER_PORT={port}" in err and "busy" in err, err


# ------------------------------------------------------------------------------------------------
# real 2-rank jobs
# ------------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_corrupt_sample_with_workers_on_two_ranks_stops_naming_the_key(shards, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(shards, out)
    corrupt_sample(out, "clip0005")
    t0 = time.time()
    p = _launch(_args(out, tmp_path / "run", "run.steps=200", "run.ckpt_every=0"))
    _, err = p.communicate(timeout=120)
    took = time.time() - t0
    assert p.returncode != 0 and took < 60, (p.returncode, took, err[-2000:])
    lines = [x for x in err.splitlines() if x.startswith("error")]
    assert any("clip0005" in x and "shard-000001.tar" in x and "checksum mismatch" in x for x in lines), err[-2000:]
    assert "Traceback" not in err and "Caught" not in err, err[-3000:]


@pytest.mark.dist
def test_lock_then_sigterm_exits_0_then_kill9_leaves_no_rank(shards, tmp_path):
    import psutil

    run = tmp_path / "run"
    a = _launch(_args(shards, run, "run.steps=100000", "run.ckpt_every=0"))
    _wait_for_step(a, run, 2)
    # a second job on the same run directory stops on every rank with one line
    b = _launch(_args(shards, run, "run.steps=100000", "--resume", "auto"))
    _, err = b.communicate(timeout=120)
    assert b.returncode != 0 and "in use by another training job" in err, err[-2000:]
    assert a.poll() is None
    # SIGTERM to every process of the job, as a scheduler sends it (launcher, torchrun, ranks, workers)
    for p in [psutil.Process(a.pid), *psutil.Process(a.pid).children(recursive=True)]:
        p.send_signal(signal.SIGTERM)
    out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err[-3000:]
    assert "stopping on SIGTERM" in out and "every rank wrote checkpoint step-" in out, out[-2000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert (run / "checkpoints" / "latest").exists()

    # kill -9 of the launcher alone: torchrun, the ranks and their loader workers all die with it
    c = _launch(_args(shards, run, "run.steps=100000", "run.ckpt_every=0", "--resume", "auto"))
    last = int(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"])
    _wait_for_step(c, run, last + 2)
    below = psutil.Process(c.pid).children(recursive=True)
    assert len(below) >= 3  # torchrun agent + 2 ranks (+ workers)
    os.kill(c.pid, signal.SIGKILL)
    c.wait(timeout=10)
    for pipe in (c.stdout, c.stderr):  # closed here: the ranks may hold the other ends until they are gone
        pipe.close()
    _, alive = psutil.wait_procs(below, timeout=10)
    assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
    # and a new job can take the run directory at once
    RunLock(run).acquire().release()
