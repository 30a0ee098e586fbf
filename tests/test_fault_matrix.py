"""Fault matrix of the data side, with real processes and bounded time.

- Shared memory exhausted in the loader workers of `osp encode` and `osp train`: the job exits within
  30 s with one line naming the fix. The fault: RLIMIT_FSIZE on the job (SIGXFSZ ignored) makes torch's
  shared-memory files unresizable, as a full /dev/shm does. Positive control: the same jobs with the
  guard removed (`Tensor.share_memory_` a no-op through a sitecustomize) are still running 30 s later.
- A loader worker killed with SIGKILL (encode and train) stops the loader with one line.
- A full disk (a file-size limit) while writing a shard: one line naming path, free space and the
  shards kept; the re-run without the limit is byte-identical to an uninterrupted encode.
- An index row whose latent_t was edited (3 -> 1) is corrupt, also when the shape filter leaves it out.
- A text-encoder .bin holding more than tensors is refused with one line naming the file.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fault_helpers import damage  # noqa: E402
from train_helpers import make_shards  # noqa: E402

from osp.common import shards as S  # noqa: E402
from osp.common.errors import ConfigError  # noqa: E402
from osp.common.loader_guard import LoaderWorkerError  # noqa: E402
from osp.stage2_train.data import CorruptSampleError, ShardLoader  # noqa: E402

ROOT = Path(__file__).parent.parent
PY = sys.executable
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OSP_DEVICE": "cpu",
    "PYTHONWARNINGS": "ignore",
}
DEADLINE = 30.0  # seconds from the start of loading to the exit
VIDEO = (3, 6, 8)  # latent T x H x W of the tiny preset
NO_GUARD = "import torch\ntorch.Tensor.share_memory_ = lambda self: self  # the loader guard removed\n"


def _file_limit(nbytes: int):
    """preexec_fn: files (shared memory included) of the job may not grow past `nbytes`."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 short videos (one with a caption long enough to make shard 2 of 4 the only big one) + models."""
    from osp.common.demo_data import write_mp4
    from osp.common.demo_models import write_demo_models

    root = tmp_path_factory.mktemp("matrix")
    (root / "data" / "v").mkdir(parents=True)
    recs = []
    for i in range(8):
        video = np.random.default_rng(i).integers(0, 255, (12, 96, 128, 3)).astype(np.uint8)
        write_mp4(root / "data" / "v" / f"c{i}.mp4", video, 24)
        cap = " ".join(f"word{j}" for j in range(300)) if i == 4 else f"clip {i} of a cat"
        res = {"height": 96, "width": 128}
        recs.append({"path": f"v/c{i}.mp4", "cap": cap, "fps": 24.0, "duration": 0.5, "resolution": res})
    (root / "data" / "annotation.json").write_text(json.dumps(recs))
    write_demo_models(root / "models")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("matrix_shards") / "tiny", 8)


def _encode_cmd(root: Path, out: Path, *more: str) -> list[str]:
    return [
        PY,
        "-m",
        "osp.common.cli",
        "encode",
        "--data",
        str(root / "data"),
        "--out",
        str(out),
        *("--preset", "tiny", "--height", "48", "--width", "64"),
        *("--vae", str(root / "models" / "vae"), "--text-encoder", str(root / "models" / "text_encoder")),
        *("--samples-per-shard", "2", "--batch-size", "2", "--no-progress"),
        *more,
    ]


def _train_cmd(shards: Path, run: Path, *more: str) -> list[str]:
    return [
        str(Path(PY).with_name("osp")),
        "train",
        *("--config", str(ROOT / "stage2_train" / "configs" / "demo.toml"), "--tp", "1", "--no-sp"),
        f"data.shards={shards}",
        f"run.dir={run}",
        *("run.log_every=0", "run.tensorboard=false", "run.ckpt_every=0"),
        *more,
    ]


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# shared memory exhausted: one line within 30 s; without the guard the job hangs
# ------------------------------------------------------------------------------------------------
class Job:
    """A job in its own session with stdout/stderr in files; `started()` says loading has begun."""

    def __init__(self, name: str, cmd: list[str], tmp: Path, limit: int, started, guard: bool):
        self.name, self.started_fn, self.guard = name, started, guard
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        env = dict(ENV)
        if not guard:
            site = tmp / f"{name}_site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(NO_GUARD)
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=o, stderr=e, cwd=ROOT, start_new_session=True, preexec_fn=_file_limit(limit)
            )
        self.t_start: float | None = None
        self.t_exit: float | None = None
        self.alive_at_deadline = False

    def poll(self, now: float) -> bool:
        """True once this job's outcome is known."""
        if self.t_start is None and self.started_fn(self):
            self.t_start = now
        if self.t_exit is None and self.proc.poll() is not None:
            self.t_exit = now
            self.t_start = self.t_start or now
            return True
        if not self.guard and self.t_start is not None and now - self.t_start > DEADLINE:
            self.alive_at_deadline = self.proc.poll() is None
            self.kill()
            return True
        return self.t_exit is not None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@pytest.mark.slow
def test_shared_memory_exhausted_stops_encode_and_train_with_one_line(dataset, shards, tmp_path):
    def plan_written(job: Job) -> bool:
        return (tmp_path / job.name / "plan.json").exists()

    def run_line(job: Job) -> bool:  # printed after the loader is built, before the first batch
        return any(line.startswith("run ") for line in job.out.read_text(errors="replace").splitlines())

    jobs = []
    for guard in (False, True):  # the controls first: their 30 s run while the guarded jobs work
        tag = "" if guard else "_unguarded"
        enc = f"encode{tag}"
        # a clip is 3 x 9 x 48 x 64 float32 = 324 KiB in shared memory, over the 64 KiB limit
        jobs.append(
            Job(enc, _encode_cmd(dataset, tmp_path / enc, "--workers", "1"), tmp_path, 2**16, plan_written, guard)
        )
        # a batch of 4 moments [8, 3, 6, 8] float16 = 9 KiB, over the 8 KiB limit (config.toml: ~1 KiB)
        tr = f"train{tag}"
        cmd = _train_cmd(shards, tmp_path / tr, "run.steps=4", "data.num_workers=1", "data.batch_size=4")
        jobs.append(Job(tr, cmd, tmp_path, 2**13, run_line, guard))
    t0 = time.monotonic()
    try:
        pending = list(jobs)
        while pending:
            now = time.monotonic()
            pending = [j for j in pending if not j.poll(now)]
            assert now - t0 < 400, [(j.name, j.stderr[-1500:]) for j in pending]
            time.sleep(0.1)
    finally:
        for j in jobs:
            if j.proc.poll() is None:
                j.kill()
    for j in jobs:
        err = j.stderr
        if not j.guard:  # positive control: the fault fired and the job still waits for the lost batch
            assert "unable to resize file" in err, (j.name, err[-2000:])
            assert j.alive_at_deadline, (j.name, j.proc.returncode, err[-2000:])
            print(f"{j.name}: still running {DEADLINE:.0f} s after loading began (killed)")
            continue
        assert j.t_exit is not None and j.t_start is not None
        took = j.t_exit - j.t_start
        print(f"{j.name}: exited {took:.1f} s after loading began (rc {j.proc.returncode})")
        assert j.proc.returncode != 0 and took < DEADLINE, (j.name, j.proc.returncode, took, err[-2000:])
        assert "Traceback" not in err and "Caught" not in err, (j.name, err[-3000:])
        lines = [x for x in err.splitlines() if x.startswith("error") and "shared memory" in x]
        assert len(lines) == 1, (j.name, err[-3000:])
        fix = "--workers 0" if j.name == "encode" else "data.num_workers=0"
        assert "unable to resize file" in lines[0] and "--shm-size" in lines[0] and fix in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------
# a worker killed with SIGKILL
# ------------------------------------------------------------------------------------------------
def _kill_worker_and_drain(before: set[int], next_item) -> LoaderWorkerError:
    """SIGKILL the loader worker (the one child of this process not in `before`), then read on."""
    import psutil

    (worker,) = [c for c in psutil.Process().children() if c.pid not in before]
    with pytest.raises(LoaderWorkerError) as e:
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:  # torch's SIGCHLD handler or its liveness check raises
            next_item()
            time.sleep(0.05)
    return e.value


def test_worker_killed_stops_the_train_loader_with_one_line(shards):
    import psutil

    before = {c.pid for c in psutil.Process().children()}
    loader = ShardLoader(shards, batch_size=1, dp_rank=0, dp_size=1, seed=0, num_workers=1)
    try:
        next(loader)
        err = _kill_worker_and_drain(before, lambda: next(loader))
    finally:
        loader.close()
    msg = str(err)
    assert "\n" not in msg and "killed by signal" in msg and "data.num_workers=0" in msg, msg
    assert "--resume auto" in msg, msg


def test_worker_killed_stops_the_decode_stream_with_one_line(dataset):
    from osp.stage1_encode.dataset import list_records, resolve_sources
    from osp.stage1_encode.plan import EncodeSpec, make_plan
    from osp.stage1_encode.run import decoded_stream

    plan = make_plan(list_records(resolve_sources(str(dataset / "data"))), EncodeSpec(9, 48, 64), 2)
    items = [it for s in plan.shards for it in s.items]
    import psutil

    before = {c.pid for c in psutil.Process().children()}
    stream = decoded_stream(items * 50, plan.spec, workers=1)  # enough clips to outlive the kill
    try:
        assert "clip" in next(stream)
        err = _kill_worker_and_drain(before, lambda: next(stream))
    finally:
        stream.close()
    msg = str(err)
    assert "\n" not in msg and "killed by signal" in msg and "--workers 0" in msg, msg


# ------------------------------------------------------------------------------------------------
# a full disk (file-size limit) while writing a shard
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_during_a_shard_write_is_one_line_and_the_rerun_is_byte_identical(dataset, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    env = ENV
    reference = subprocess.Popen(_encode_cmd(dataset, ref), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # shards 0, 1, 3 are ~20 KiB, shard 2 (the long caption) ~150 KiB: the 64 KiB limit stops at shard 2
    # (decoding in the main process: the clips would hit the same limit in shared memory first)
    limited = subprocess.run(
        _encode_cmd(dataset, out, "--workers", "0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_limit(2**16),
    )
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]
    err = limited.stderr.strip()
    assert limited.returncode != 0 and err.count("\n") == 0 and "Traceback" not in err, err[-3000:]
    assert f"{out / 'shard-000002.tar'} not written: File too large" in err and " free on " in err, err
    assert "shards 0-1 of 4 are complete" in err and "re-run the same command" in err, err
    assert S.published_shards(out) == {0, 1}
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # nothing half-written stays
    rerun = subprocess.run(_encode_cmd(dataset, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, b = _tree(ref), _tree(out)
    assert sorted(a) == sorted(b) and any(k.startswith("index.zarr") for k in a)
    assert [k for k in a if a[k] != b[k]] == []


def test_storage_full_reason_names_cause_and_free_space(tmp_path):
    import errno

    why = S.storage_full_reason(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x.tar")
    free = shutil.disk_usage(tmp_path).free
    assert why is not None and why.startswith("No space left on device (") and f"free on {tmp_path})" in why
    assert S.human_bytes(free).split()[0] in why  # the number itself, in the unit human_bytes picks
    assert S.storage_full_reason(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert S.storage_full_reason(ValueError("x"), tmp_path) is None
    assert [S.human_bytes(n) for n in (0, 1023, 1536, 3 * 2**20 + 2**19, 5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.5 MiB",
        "5.0 GiB",
    ]


# ------------------------------------------------------------------------------------------------
# an edited latent_t is corrupt, also where the shape filter leaves the row out
# ------------------------------------------------------------------------------------------------
def test_edited_latent_t_is_counted_as_corrupt_with_skip_corrupt(shards, tmp_path):
    intact = ShardLoader(shards, batch_size=1, dp_rank=0, dp_size=1, seed=0, shapes={VIDEO}, skip_corrupt=True)
    assert intact.left_out_corrupt == [] and len(intact.rows) == 8  # negative control
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    (key,) = damage(out, "edit_shape")  # latent_t 3 -> 1: it looks like a single-frame sample
    loader = ShardLoader(out, batch_size=1, dp_rank=0, dp_size=1, seed=0, shapes={VIDEO}, skip_corrupt=True)
    assert len(loader.rows) == 7 and key not in set(loader.keys[loader.rows])
    skipped = []
    for _ in range(2 * 7):  # two epochs: the left-out row is reported once per epoch, with its first batch
        b = next(loader)
        assert b.keys and b.shape == VIDEO
        skipped.append([s["key"] for s in b.skipped])
    assert skipped[0] == [key] and skipped[7] == [key] and sum(map(len, skipped)) == 2, skipped
    assert "checksum" in next(s for s in loader.left_out_corrupt)["error"]
    with pytest.raises(CorruptSampleError) as e:  # without skip_corrupt: the usual one line
        ShardLoader(out, batch_size=1, dp_rank=0, dp_size=1, seed=0, shapes={VIDEO})
    msg = str(e.value)
    assert "\n" not in msg and "shard-000001.tar" in msg and key in msg and "skip_corrupt" in msg, msg


@pytest.mark.slow
def test_edited_latent_t_is_counted_by_training(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    (key,) = damage(out, "edit_shape")
    run = tmp_path / "run"
    cmd = _train_cmd(out, run, "run.steps=2", "data.num_workers=0", "data.batch_size=1", "data.skip_corrupt=true")
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_corrupt"] for m in metrics] == [1, 1], metrics
    assert f"skipped corrupt sample {key}" in p.stdout, p.stdout[-2000:]


# ------------------------------------------------------------------------------------------------
# a text-encoder .bin that holds more than tensors
# ------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_text_encoder_bin_holding_non_tensors_is_refused_naming_the_file(dataset, tmp_path):
    from safetensors.torch import load_file

    from osp.common.models.text import TextEncoder

    te = tmp_path / "te"
    shutil.copytree(dataset / "models" / "text_encoder", te)
    ref = TextEncoder.from_pretrained(te, device="cpu").encode_unpadded(["a cat on a mat"])[0]
    weights = load_file(te / "model.safetensors")
    (te / "model.safetensors").unlink()
    binf = te / "pytorch_model.bin"
    torch.save(weights, binf)  # negative control: plain tensors in a .bin load and encode the same
    assert torch.equal(TextEncoder.from_pretrained(te, device="cpu").encode_unpadded(["a cat on a mat"])[0], ref)

    torch.save({**weights, "shared.weight": "not a tensor"}, binf)
    with pytest.raises(ConfigError) as e:
        TextEncoder.from_pretrained(te, device="cpu")
    assert str(e.value).startswith(f"{binf}: entry 'shared.weight' is a str") and "\n" not in str(e.value)

    torch.save(["a list"], binf)
    with pytest.raises(ConfigError, match=f"{binf}: holds a list"):
        TextEncoder.from_pretrained(te, device="cpu")

    marker = tmp_path / "payload_ran"
    torch.save({"shared.weight": _Payload(marker)}, binf)
    with pytest.raises(ConfigError) as e:
        TextEncoder.from_pretrained(te, device="cpu")
    assert str(e.value).startswith(f"{binf}: the .bin weights were refused") and "\n" not in str(e.value)
    assert "add_safe_globals" not in str(e.value) and not marker.exists()
    torch.load(binf, weights_only=False)  # positive control: a plain unpickler runs the payload
    assert marker.exists()

    # through the CLI: one line, no traceback
    torch.save({**weights, "shared.weight": "not a tensor"}, binf)
    models = dataset / "models"
    cmd = _encode_cmd(dataset, tmp_path / "out")
    cmd[cmd.index(str(models / "text_encoder"))] = str(te)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode != 0 and err.count("\n") == 0 and str(binf) in err and "Traceback" not in err, err
