"""`osp train`: one parser whose every flag sets one config key, the same in real and dry runs; a fast
`--help` that imports no torch; a free rendezvous port on one node; a run folder never silently reused.

The flag tests parse the real command line (typer) with the three entry points replaced by recorders,
so they assert on the config object each entry point receives; the process tests run `osp train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "stage2_train" / "configs" / "demo.toml"
PY = sys.executable
OSP = str(Path(PY).with_name("osp"))
# no inherited rendezvous: a test that wants one passes it
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")},
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


# ------------------------------------------------------------------------------------------------
# the parser: every flag takes effect, the same for a real and a dry run
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def entry(monkeypatch):
    """Replace run.main, launch.launch and dryrun.run by recorders; returns the list of calls."""
    from osp.stage2_train import dryrun, launch, run

    calls: list[tuple[str, object, dict]] = []

    def recorder(name: str, rc: int = 0):
        def record(cfg, **kw):
            calls.append((name, cfg, kw))
            return rc

        return record

    monkeypatch.setattr(run, "main", recorder("run"))
    monkeypatch.setattr(launch, "launch", recorder("launch"))
    monkeypatch.setattr(dryrun, "run", recorder("dryrun"))
    return calls


def _invoke(*args: str):
    from typer.testing import CliRunner

    from osp.common.cli import app

    return CliRunner().invoke(app, ["train", *args])


# flag arguments -> the config values they must set (each flag of `osp train --help` appears here)
FLAG_CASES: list[tuple[list[str], dict]] = [
    (["--resume", "auto"], {"run.resume": "auto"}),
    (["--init", "ckpt/x"], {"model.init": "ckpt/x"}),
    (["--shards", "shards/other"], {"data.shards": "shards/other"}),
    (["--steps", "7"], {"run.steps": 7}),
    (["--preset", "osp12-93x480p"], {"model.preset": "osp12-93x480p"}),
    (["--tp", "1", "--no-sp"], {"parallel.tp": 1, "parallel.sp": False}),
    (["--tp", "4", "--sp", "parallel.sp=false"], {"parallel.tp": 4, "parallel.sp": True}),  # flags win
    (["--cp", "2"], {"parallel.cp": 2}),
    (["--checkpointing", "selective"], {"model.checkpointing": "selective"}),
    (["--checkpointing", "full"], {"model.checkpointing": "full"}),
    (["--nproc", "3"], {"launch.nproc": 3}),
    (["--nnodes", "2", "--node-rank", "1"], {"launch.nnodes": 2, "launch.node_rank": 1}),
    (["--master-addr", "10.0.0.1"], {"launch.master_addr": "10.0.0.1"}),
    (["--master-port", "29999"], {"launch.master_port": 29999}),
    (["run.steps=11", "optim.lr=2e-4"], {"run.steps": 11, "optim.lr": 2e-4}),  # overrides
]
DRY_CASES: list[tuple[list[str], dict]] = [
    (["--rank", "3", "--nproc", "4"], {"dryrun.rank": 3, "launch.nproc": 4}),
    (["--card-gb", "40"], {"dryrun.card_gb": 40.0}),
]


def _value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("args,want", FLAG_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_flag_sets_its_key_in_real_and_dry_runs(entry, args, want):
    from osp.stage2_train.config import TrainConfig

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    flags = any(a.startswith("--") for a in args)
    base = TrainConfig.load(DEMO, overrides if flags else [])
    for key, value in want.items():  # the control: without the flags the config holds another value
        assert _value(base, key) != value, key
    real = _invoke("--config", str(DEMO), *args)
    assert real.exit_code == 0, real.output
    dry = _invoke("--config", str(DEMO), "--dry-run", *args)
    assert dry.exit_code == 0, dry.output
    (kind_real, cfg_real, _), (kind_dry, cfg_dry, _) = entry
    assert kind_dry == "dryrun" and kind_real in ("run", "launch")
    for key, value in want.items():
        assert _value(cfg_real, key) == value, key
    assert cfg_real == cfg_dry  # one meaning for both


@pytest.mark.parametrize("args,want", DRY_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_dry_run_flags(entry, args, want):
    res = _invoke("--config", str(DEMO), "--dry-run", *args)
    assert res.exit_code == 0, res.output
    (kind, cfg, kw), *_ = entry
    assert kind == "dryrun" and kw == {"json_out": False}
    for key, value in want.items():
        assert _value(cfg, key) == value, key
    # outside a dry run they are refused with one line instead of being ignored
    res = _invoke("--config", str(DEMO), *args)
    assert res.exit_code == 1 and "add --dry-run" in res.output and len(entry) == 1, res.output


def test_mode_flags_choose_the_entry_point(entry, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[run]\nsteps = 3\n[data]\nshards = "s"\n')
    assert _invoke("--config", str(cfg_file)).exit_code == 0  # --config: its values, one process
    assert _invoke("--config", str(cfg_file), "--restart").exit_code == 0
    assert _invoke("--config", str(cfg_file), "--dry-run", "--json").exit_code == 0
    assert _invoke("--config", str(DEMO)).exit_code == 0  # TP=2: 2 processes (launch.nproc 0 = tp x cp)
    assert _invoke("--config", str(cfg_file), "--nnodes", "2", "--master-port", "29999").exit_code == 0
    kinds = [(k, kw) for k, _, kw in entry]
    assert kinds == [
        ("run", {"restart": False}),
        ("run", {"restart": True}),
        ("dryrun", {"json_out": True}),
        ("launch", {"restart": False}),
        ("launch", {"restart": False}),
    ]
    assert entry[0][1].run.steps == 3 and entry[0][1].data.shards == "s"
    assert entry[3][1].nproc == 2 and entry[3][1].world == 2 and entry[4][1].world == 2
    # refusals: a mode that cannot apply, a value outside the choices, a bad override
    assert _invoke("--config", str(cfg_file), "--json").exit_code == 1
    assert _invoke("--config", str(cfg_file), "--dry-run", "--restart").exit_code == 1
    res = _invoke("--config", str(cfg_file), "--checkpointing", "some")
    assert res.exit_code == 2 and "selective" in res.output
    res = _invoke("--config", str(DEMO), "--tp", "1")  # demo.toml has sp = true
    assert res.exit_code == 1 and "--no-sp" in res.output
    assert len(entry) == 5


def test_world_is_the_earlier_spelling_of_one_node(entry):
    """The hidden --world N sets what --nnodes 1 --nproc N sets; combined with them it is refused."""
    a = _invoke("--config", str(DEMO), "--dry-run", "--world", "8", "--rank", "3")
    b = _invoke("--config", str(DEMO), "--dry-run", "--nnodes", "1", "--nproc", "8", "--rank", "3")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    (_, cfg_a, _), (_, cfg_b, _) = entry
    assert cfg_a == cfg_b and cfg_a.world == 8
    bad = _invoke("--config", str(DEMO), "--dry-run", "--world", "8", "--nproc", "4")
    assert bad.exit_code != 0 and "not both" in bad.output


def test_every_flag_of_the_help_is_tested():
    """A new `osp train` flag without a case above fails here."""
    import typer.main

    from osp.common.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands["train"]  # pyright: ignore[reportAttributeAccessIssue]
    shown = {o for p in cmd.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
    shown = {o for o in shown if o.startswith("--")}  # --world (hidden): test_world_is_the_earlier_spelling
    tested = {a for args, _ in FLAG_CASES + DRY_CASES for a in args if a.startswith("--")}
    modes = {"--config", "--dry-run", "--json", "--restart"}  # test_mode_flags_choose_the_entry_point
    assert shown == tested | modes, shown ^ (tested | modes)


def test_help_is_fast_because_it_imports_no_torch():
    """`osp train --help` (and `osp --help`) import neither torch nor a stage's heavy modules."""
    code = (
        "import sys\n"
        "from osp.common.cli import main\n"
        "sys.argv = ['osp', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'megatron'))\n"
        "print('HEAVY', heavy)\n"
    )
    for args in (["train", "--help"], ["--help"]):
        p = subprocess.run([PY, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "HEAVY []" in p.stdout, p.stdout[-500:]
    p = subprocess.run([PY, "-c", code, "train", "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert "none|selective|full" in p.stdout and "launch.master_port=0" in p.stdout, p.stdout
    # the positive control: importing the trainer does pull torch in
    p = subprocess.run(
        [PY, "-c", "import sys, osp.stage2_train.run; print('torch' in sys.modules)"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.strip() == "True", p.stderr


# ------------------------------------------------------------------------------------------------
# run folders: refuse, resume, restart
# ------------------------------------------------------------------------------------------------
def test_claim_run_dir_refuses_moves_aside_and_respects_the_lock(tmp_path):
    from osp.common.errors import ConfigError
    from osp.stage2_train.lock import RunLock, RunLockedError
    from osp.stage2_train.rundir import RunExistsError, claim_run_dir

    run = tmp_path / "run"
    assert claim_run_dir(run, "", False) is None  # nothing there: a new run
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-0000004\n")
    with pytest.raises(RunExistsError) as e:
        claim_run_dir(run, "", False)
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and "step-0000004" in msg
    assert "--resume auto" in msg and "run.name=" in msg and "--restart" in msg
    assert claim_run_dir(run, "auto", False) is None and (run / "checkpoints").is_dir()  # resume: untouched
    with pytest.raises(ConfigError, match="pass one of them"):
        claim_run_dir(run, "auto", True)
    lock = RunLock(run).acquire()  # a live job: --restart moves nothing
    with pytest.raises(RunLockedError):
        claim_run_dir(run, "", True)
    lock.release()
    assert (run / "checkpoints" / "latest").is_file()
    said: list[str] = []
    dest = claim_run_dir(run, "", True, said.append)
    assert dest is not None and dest.name.startswith("run.old-") and not run.exists()
    assert (dest / "checkpoints" / "latest").read_text() == "step-0000004\n"
    assert said == [f"--restart: moved the earlier run {run} to {dest}"]


def _train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([OSP, "train", *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tp1_flags_train_then_refuse_resume_restart(tmp_path):
    """The demo config (TP=2 + SP) with --tp 1 --no-sp trains in one process at TP=1; then the run
    folder is refused without --resume auto, continued with it, and moved aside with --restart."""
    shards = make_shards(tmp_path / "shards", 4)
    run = tmp_path / "run"
    common = ["--config", str(DEMO), "--shards", str(shards), f"run.dir={run}", "data.num_workers=0"]
    common += ["run.log_every=1", "run.tensorboard=false", "run.ckpt_every=0"]
    p = _train("--tp", "1", "--no-sp", "--steps", "2", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "layout tp=1 cp=1 dp=1 sp=False" in p.stdout, p.stdout[-2000:]
    assert _steps(run) == [1, 2] and (run / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert "tp = 1" in (run / "config.toml").read_text()

    p = _train("--tp", "1", "--no-sp", "--steps", "3", *common)  # the same run again, no --resume
    err = p.stderr.strip()
    assert p.returncode == 1 and err.count("\n") == 0, err
    assert str(run) in err and "--resume auto" in err and "--restart" in err, err
    assert _steps(run) == [1, 2]  # nothing was written

    p = _train("--tp", "1", "--no-sp", "--steps", "3", "--resume", "auto", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout and _steps(run) == [1, 2, 3]

    p = _train("--tp", "1", "--no-sp", "--steps", "1", "--restart", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    old = [d for d in tmp_path.iterdir() if d.name.startswith("run.old-")]
    assert len(old) == 1 and f"moved the earlier run {run} to {old[0]}" in p.stdout, p.stdout[-2000:]
    assert _steps(old[0]) == [1, 2, 3] and _steps(run) == [1]


# ------------------------------------------------------------------------------------------------
# rendezvous: a free port on one node, MASTER_ADDR/MASTER_PORT for several
# ------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.slow
def test_two_single_node_jobs_at_once_both_finish(tmp_path):
    """Two 2-process jobs on one machine, no port given: each rendezvouses on its own free port."""
    shards = make_shards(tmp_path / "shards", 4)
    jobs = []
    for name in ("a", "b"):
        cmd = [OSP, "train", "--config", str(DEMO), "--shards", str(shards), f"run.dir={tmp_path / name}"]
        cmd += ["--steps", "2", "data.num_workers=0", "run.log_every=1", "run.tensorboard=false"]
        jobs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [j.communicate(timeout=400) for j in jobs]
    for j, (out, err) in zip(jobs, outs):
        assert j.returncode == 0, err[-3000:]
        assert "layout tp=2" in out
    assert _steps(tmp_path / "a") == [1, 2] and _steps(tmp_path / "b") == [1, 2]


def test_launch_arguments_free_port_on_one_node_fixed_for_several(monkeypatch):
    from osp.stage2_train import launch
    from osp.stage2_train.config import TrainConfig

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    one = TrainConfig.load(DEMO)
    addr, port = launch.rendezvous(one)
    assert (addr, port) == ("127.0.0.1", 0)
    args = launch.torchrun_args(one, addr, port)
    assert "--standalone" in args and "--master_port" not in args and args[args.index("--nproc_per_node") + 1] == "2"
    monkeypatch.setenv("MASTER_PORT", "29777")  # given: used, on one node too
    assert launch.rendezvous(one) == ("127.0.0.1", 29777)
    assert "--standalone" not in launch.torchrun_args(one, "127.0.0.1", 29777)
    two = TrainConfig.load(DEMO, flags={"launch.nnodes": 2, "launch.master_addr": "10.0.0.1", "launch.nproc": 8})
    assert launch.rendezvous(two) == ("10.0.0.1", 29777)
    args = launch.torchrun_args(two, "10.0.0.1", 29777)
    assert args[:8] == ["--nnodes", "2", "--node_rank", "0", "--master_addr", "10.0.0.1", "--master_port", "29777"]
    monkeypatch.delenv("MASTER_PORT")
    from osp.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--master-port"):
        launch.rendezvous(two)


def _make_n(*args: str) -> str:
    """The commands `make` would run for osp and torchrun (continuation lines joined)."""
    p = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.replace("\\\n", " ").splitlines()
    return "\n".join(x for x in lines if "bin/osp " in x or "bin/torchrun " in x)


def test_makefile_rendezvous_and_no_stage2_launcher_for_encode():
    train = _make_n("train")
    assert "osp train" in train and "--master-port" not in train and "--resume auto" in train
    assert "--master-port 29512" in _make_n("train", "NNODES=2")
    assert "--master-port 4242" in _make_n("train", "MASTER_PORT=4242")
    enc = _make_n("encode", "GPUS_PER_NODE=2")
    assert "--standalone" in enc and "stage2_train" not in enc and "precheck" not in enc
    enc = _make_n("encode", "NNODES=2", "MASTER_ADDR=10.0.0.1")
    assert "osp precheck --nnodes 2" in enc and "--master_port 29512" in enc and "stage2_train" not in enc
    dry = _make_n("train", "DRY_RUN=1", "NNODES=2", "GPUS_PER_NODE=8", "TP=1")
    assert "--dry-run" in dry and "--nnodes 2 --nproc 8" in dry and "--tp 1 --no-sp" in dry


def test_precheck_command_names_a_busy_port():
    import socket

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        p = subprocess.run(
            [OSP, "precheck", "--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1"]
            + ["--master-port", str(port)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
    err = p.stderr.strip()
    assert p.returncode == 2 and err.count("\n") == 0 and f"MASTER_PORT={port}" in err and "busy" in err, err
    p = subprocess.run(  # the control: the same port, free again
        [
            OSP,
            "precheck",
            "--nnodes",
            "1",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
