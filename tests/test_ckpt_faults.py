"""Checkpoints under attack and under faults, with real processes:

* crafted `.metadata` pickles (and a DCP bytes entry) in a real training checkpoint run no code through
  `--resume`, `--init`, `osp sample --checkpoint` and `osp convert export`; each payload DOES run under
  plain `pickle` / `torch.load` (the positive control); a legit checkpoint still loads;
* a damaged `.distcp` and a damaged safetensors file are one-line refusals naming the file;
* a checkpoint write that the file system refuses (RLIMIT_FSIZE: EFBIG) stops training with one line
  naming the checkpoint, the free space and the latest one kept; a resume without the limit gives the
  losses of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_shards  # noqa: E402

from osp.common.cli import app  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
for _k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def _train(run: Path, shards: Path, steps: int, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
    cmd = [
        PY,
        "-m",
        "osp.stage2_train.run",  # a rank's entry: CONFIG [section.key=value ...]
        str(ROOT / "stage2_train" / "configs" / "demo.toml"),
        "run.resume=auto",
        f"data.shards={shards}",
        f"run.dir={run}",
        f"run.steps={steps}",
        "run.ckpt_every=2",
        "data.num_workers=0",
        "run.log_every=0",
        "run.tensorboard=false",
        "parallel.tp=1",
        "parallel.sp=false",
        *extra,
    ]

    def limit_file_size():  # in the child: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        cmd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size if limit else None,
    )


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A real tiny run: 2 steps, checkpoint step-0000002 (with EMA)."""
    root = tmp_path_factory.mktemp("ckfaults")
    shards = make_shards(root / "shards", 8)
    run = root / "run"
    p = _train(run, shards, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    step = run / "checkpoints" / "step-0000002"
    assert (step / ".metadata").is_file()
    return {"root": root, "shards": shards, "run": run, "step": step}


# ------------------------------------------------------------------------------------------------
# crafted payloads
# ------------------------------------------------------------------------------------------------
class _Call:
    """Pickles as `fn(*args)`: what an attacker's pickle makes the unpickler call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _sbu(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _stack_global_call(module: str, name: str, arg_pickle: bytes) -> bytes:
    """Protocol 4: STACK_GLOBAL(module, name) applied to one argument (a dotted name reaches attributes)."""
    return b"\x80\x04" + _sbu(module) + _sbu(name) + b"\x93" + arg_pickle + b"\x85R."


def payloads(marker: Path, legit: bytes) -> dict[str, bytes]:
    """name -> a `.metadata` replacement that creates `marker` when unpickled by plain pickle."""
    import subprocess as sp

    from torch.distributed.checkpoint.metadata import Metadata

    m = str(marker)
    code = f"open({m!r}, 'w').write('ran')"
    md = pickle.loads(legit)
    assert isinstance(md, Metadata)
    nested = pickle.loads(legit)
    key = next(iter(nested.state_dict_metadata))
    nested.state_dict_metadata[key] = _Call(os.system, f"touch {m}")
    in_storage = pickle.loads(legit)
    in_storage.storage_meta = _Call(exec, code)
    path_arg = pickle.dumps(Path(m), protocol=2)[2:-1]  # the PosixPath object, without PROTO / STOP
    return {
        "os.system": pickle.dumps(_Call(os.system, f"touch {m}")),
        "builtins.exec": pickle.dumps(_Call(exec, code)),
        "builtins.eval": pickle.dumps(_Call(eval, code)),
        "subprocess.check_call": pickle.dumps(_Call(sp.check_call, ["touch", m])),
        "protocol0 os.system": pickle.dumps(_Call(os.system, f"touch {m}"), protocol=0),
        "INST opcode": f"(S'touch {m}'\nios\nsystem\n.".encode(),
        "getattr(__import__)": (
            f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch {m}'\ntR.".encode()
        ),
        "nested in Metadata": pickle.dumps(nested),
        "storage_meta exec": pickle.dumps(in_storage),
        # a dotted name under an allowed module reaches its imports
        "dotted filesystem.os.system": _stack_global_call(
            "torch.distributed.checkpoint.filesystem", "os.system", _sbu(f"touch {m}")
        ),
        # a dotted name under an allowed class reaches its methods
        "dotted PosixPath.touch": _stack_global_call("pathlib", "PosixPath.touch", path_arg),
        "torch.load of a pickle": _torch_load_payload(marker),
    }


def _torch_load_payload(marker: Path) -> bytes:
    """`torch.load(<file>, weights_only=False)` of a file holding an exec payload (a second stage)."""
    stage2 = marker.with_suffix(".stage2")
    torch.save(_Call(exec, f"open({str(marker)!r}, 'w').write('ran')"), stage2)
    import functools

    return pickle.dumps(_Call(functools.partial(torch.load, weights_only=False), str(stage2)))


def _bytes_entry_checkpoint(src: Path, dst: Path, marker: Path) -> None:
    """A DCP checkpoint whose model/EMA `proj_out.bias` is a bytes entry holding a pickled payload
    (DCP's bytes path unpickles with torch.load(weights_only=False)); the metadata itself is clean."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(sd, checkpoint_id=str(src), no_dist=True)
    for k in ("model.proj_out.bias", "ema.proj_out.bias"):
        sd[k] = _Call(exec, f"open({str(marker)!r}, 'w').write('ran')")
    dcp.save(sd, checkpoint_id=str(dst), no_dist=True)
    for f in ("config.json", "trainer.json"):
        shutil.copy(src / f, dst / f)


@pytest.fixture(scope="module")
def crafted(trained) -> dict:
    root, step = trained["root"], trained["step"]
    marker = root / "MARKER"
    legit = (step / ".metadata").read_bytes()
    dirs = {}
    for i, (name, data) in enumerate(payloads(marker, legit).items()):
        d = root / "crafted" / f"p{i:02d}" / "checkpoints" / "step-0000002"
        shutil.copytree(step, d)
        (d / ".metadata").write_bytes(data)
        dirs[name] = d
    d = root / "crafted" / "bytes" / "checkpoints" / "step-0000002"
    _bytes_entry_checkpoint(step, d, marker)
    dirs["DCP bytes entry"] = d
    assert not marker.exists()
    return {"marker": marker, "dirs": dirs}


# the payloads open the marker file the way an attacker's one-liner would, without closing it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_payload_runs_under_plain_pickle(crafted):
    """Positive control: each crafted file does execute code when loaded the way DCP does by default."""
    marker = crafted["marker"]
    for name, d in crafted["dirs"].items():
        marker.unlink(missing_ok=True)
        if name == "DCP bytes entry":
            import torch.distributed.checkpoint as dcp

            dcp.load({"model.proj_out.bias": torch.empty(0)}, checkpoint_id=str(d), no_dist=True)
        else:
            with open(d / ".metadata", "rb") as f:
                try:
                    pickle.load(f)
                except Exception:
                    pass  # some payloads return an object that is not metadata; the code already ran
        assert marker.exists(), f"payload {name!r} did not run under plain pickle"
    marker.unlink(missing_ok=True)


def _one_line_error(output: str, *names: str) -> None:
    lines = [x for x in output.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert any(n in errors[0] for n in names), errors[0]


def test_no_payload_runs_through_convert_or_sample(crafted, tmp_path):
    marker = crafted["marker"]
    for name, d in crafted["dirs"].items():
        r = CliRunner().invoke(app, ["convert", "export", str(d), str(tmp_path / "export")])
        assert r.exit_code != 0 and not marker.exists(), (name, r.output)
        _one_line_error(r.output, ".metadata", ".distcp")
        r = CliRunner().invoke(app, ["convert", "merge", str(d), str(tmp_path / "merged")])
        assert r.exit_code != 0 and not marker.exists(), (name, r.output)
        # sample refuses while reading the DiT: before the VAE and text encoder are opened
        args = ["sample", "--checkpoint", str(d.parent.parent), "--vae", "v", "--text-encoder", "t"]
        r = CliRunner().invoke(app, [*args, "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "s")])
        assert r.exit_code != 0 and not marker.exists(), (name, r.output)
        _one_line_error(r.output, ".metadata", ".distcp")


@pytest.mark.slow
def test_no_payload_runs_through_resume_or_init(trained, crafted, tmp_path):
    marker = crafted["marker"]
    out = tmp_path / "results.json"
    args = [f"{name}={d}" for name, d in crafted["dirs"].items()]
    cmd = [PY, str(HERE / "ckpt_attack_worker.py"), str(trained["shards"]), str(tmp_path), str(out), *args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not marker.exists()
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(crafted["dirs"])
    for name, r in results.items():
        for how in ("resume", "init"):
            rc, err = r[how]
            assert rc != 0, (name, how, err)
            _one_line_error(err, ".metadata", ".distcp")
    # the CLI entry point itself, once: exit 1 and one line
    d = crafted["dirs"]["os.system"]
    p = _train(tmp_path / "cli", trained["shards"], 3, f"model.init={d}")
    assert p.returncode == 1 and not marker.exists(), p.stderr[-3000:]
    _one_line_error(p.stderr, ".metadata")


def test_legit_checkpoint_loads_through_every_reader(trained, tmp_path):
    from osp.stage2_train.checkpoint import load_dit_checkpoint, open_dit, read_metadata

    step = trained["step"]
    md = read_metadata(step)
    assert any(k.startswith("ema.") for k in md.state_dict_metadata)
    _, ema = load_dit_checkpoint(step)
    assert torch.equal(open_dit(trained["run"]).state_dict()["proj_out.weight"], ema["proj_out.weight"])
    r = CliRunner().invoke(app, ["convert", "export", str(step), str(tmp_path / "export")])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------
# damaged files: one line naming the file
# ------------------------------------------------------------------------------------------------
def test_truncated_distcp_is_one_line(trained, tmp_path):
    d = tmp_path / "run" / "checkpoints" / "step-0000002"
    shutil.copytree(trained["step"], d)
    (f,) = d.glob("*.distcp")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 20])
    r = CliRunner().invoke(app, ["convert", "export", str(d), str(tmp_path / "export")])
    assert r.exit_code != 0
    _one_line_error(r.output, f.name)
    assert "damaged" in r.output


def test_damaged_safetensors_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from osp.common.models.dit import build_dit

    dit = build_dit("tiny")
    d = tmp_path / "released"
    d.mkdir()
    dit.config.to_json(d / "config.json")
    f = d / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(f))
    data = f.read_bytes()
    for kind, bad in (
        ("huge header", struct.pack("<Q", 2**40) + data[8:]),
        ("garbled header", data[:8] + b"\xff" * 64 + data[72:]),
        ("truncated", data[: len(data) // 2]),
    ):
        f.write_bytes(bad)
        r = CliRunner().invoke(app, ["convert", "import", str(d), str(tmp_path / "out")])
        assert r.exit_code != 0, kind
        _one_line_error(r.output, str(f))
        from osp.stage2_train.state_dict_adapter import CheckpointError, SliceReader

        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            SliceReader(d)  # the --init path (slices)


# ------------------------------------------------------------------------------------------------
# a checkpoint write the file system refuses
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_refused_checkpoint_write_stops_in_one_line_and_resume_is_exact(trained, tmp_path):
    shards, base = trained["shards"], trained["run"]
    distcp = sum(f.stat().st_size for f in trained["step"].glob("*.distcp"))
    limit = 256 * 1024  # more than every other file the run writes, less than the checkpoint data
    assert distcp > 2 * limit
    ref = tmp_path / "ref"
    p = _train(ref, shards, 6)
    assert p.returncode == 0, p.stderr[-3000:]
    # synchronous: the save of step 4 fails at step 4; asynchronous: it fails in the background and is
    # reported at the next poll or, at the latest, when the save of step 6 waits for it
    for mode, last in (("false", 4), ("true", 6)):
        run = tmp_path / f"limited-{mode}"
        shutil.copytree(base, run)
        p = _train(run, shards, 10, f"run.async_ckpt={mode}", limit=limit)
        assert p.returncode == 1, (mode, p.stderr[-3000:])
        _one_line_error(p.stderr, "checkpoint step-0000004 not written")
        line = next(x for x in p.stderr.splitlines() if x.startswith("error"))
        assert "File too large" in line and "free at" in line and "latest is still step-0000002" in line, line
        ck = run / "checkpoints"
        assert (ck / "latest").read_text().strip() == "step-0000002"
        assert sorted(x.name for x in ck.iterdir()) == ["latest", "step-0000002"]  # no partial folder left
        assert 4 <= max(_losses(run)) <= last  # training stopped instead of going on without checkpoints
    # the same run without the limit resumes from step 2: losses equal the uninterrupted run exactly
    p = _train(run, shards, 6, "run.async_ckpt=true")
    assert p.returncode == 0, p.stderr[-3000:]
    want, got = _losses(ref), _losses(run)
    assert [got[s] for s in range(3, 7)] == [want[s] for s in range(3, 7)]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_storage_error_is_found_under_dcp_wrappers():
    """The classifier: an OSError anywhere under DCP's CheckpointException / torch's RuntimeError; a
    plain bug (no OSError) is not a storage error and keeps its traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    from osp.stage2_train.checkpoint import _storage_error

    try:
        try:
            raise OSError(27, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        wrapped = CheckpointException("write", {0: (e, None)})
    found = _storage_error(wrapped)
    assert isinstance(found, OSError) and found.errno == 27
    assert _storage_error(CheckpointException("write", {0: (ValueError("shape"), None)})) is None
