"""Multi-process / multi-node launch: pre-check the rendezvous, then run torchrun as a child it owns.

    osp train --config my.toml --nnodes 2 --node-rank 0 --nproc 8 --master-addr 10.0.0.1 --master-port 29512

`osp train` calls `launch(cfg)` when the job has more than one process (launch.nproc, launch.nnodes).
The ranks run `python -m osp.stage2_train.run RESOLVED.toml`: the config osp train resolved, written to
a temporary file, read by the same loader (no second command line). One node without a port
(launch.master_port = 0 and no MASTER_PORT) rendezvouses on a free port (torchrun's standalone mode),
so any number of single-node jobs run side by side; several nodes keep MASTER_ADDR/MASTER_PORT.

torchrun alone waits silently for its whole rendezvous timeout and then prints a long trace when a
node is missing, dies with a traceback on SIGTERM, and leaves its ranks running when it is killed
(each rank is in its own session). This wrapper:
  * pre-checks (osp.common.rendezvous) within launch.precheck_timeout_s and fails with one line
    naming what is missing (a node, the address, a busy port);
  * refuses a new run in a run folder that holds checkpoints, or moves it aside on --restart
    (osp.stage2_train.rundir), once, on node 0, before any rank starts;
  * runs torchrun in its own session with a parent-death signal, and every rank (and loader worker)
    sets one too (`osp.common.process.die_with_parent`): however the launcher dies, kill -9 included, the job dies;
  * on SIGTERM/SIGINT/SIGHUP, at any moment and any number of times, stops the job cleanly: the ranks
    agree on a step, checkpoint it and exit 0 (or, stopped during start-up, exit 0 before the first
    step with nothing new to save), torchrun exits 0, and the launcher prints one line and exits 0.
    No signal handler does work: the launcher's records the signal and its wait loop forwards SIGTERM
    to torchrun; torchrun's agent and the ranks start with the stop signals blocked (inherited
    through exec), the agent takes them in a thread (`sigtimedwait`) and SIGTERMs each rank once, and
    a rank unblocks SIGTERM only when its train loop can act on it (a SIGTERM sent to every process of
    the job at once, as a scheduler does, meets the same paths);
  * when a rank fails, its own message (one line for a user error, a traceback for a bug) is already
    on stderr, so torchrun's traceback block is replaced by one line (rank, exit code).
parallel.init_timeout_s bounds torchrun's own rendezvous and the ranks' process-group setup.

On accelerators the ranks also get CUDA_DEVICE_MAX_CONNECTIONS=1 (`dist.accelerator_env`; a value
already in the environment wins): megatron's sequence-parallel communication overlap needs it set
before any device context exists, i.e. before torchrun starts the ranks.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import psutil  # imported here, not in a signal handler (a second signal must not meet a half-imported module)

from osp.common.errors import ConfigError
from osp.common.process import DIE_WITH_PARENT_ENV, set_parent_death_signal
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.elastic import EXIT_PEER_LOST, RESUME_ENV, check_elastic, run_is_live
from osp.stage2_train.rundir import CHECKPOINTS

AGENT_FLAG = "--torchrun"  # python -m osp.stage2_train.launch --torchrun <torchrun arguments>: the agent


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each stops the job cleanly


def _children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def _term(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _start_blocked() -> None:  # preexec_fn of torchrun: it dies with the launcher, stop signals held back
    if sys.platform.startswith("linux"):
        set_parent_death_signal(signal.SIGKILL)
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))


class _Stops:
    """Stop signals received by the launcher. The handler only records the signal; `run_torchrun`'s
    wait loop forwards them (a handler that imports or walks processes can meet a second signal)."""

    def __init__(self):
        self.names: list[str] = []
        self.previous: dict[int, object] = {}

    def _record(self, signum, _frame) -> None:  # a signal handler: record, nothing else
        self.names.append(signal.Signals(signum).name)

    def __enter__(self) -> _Stops:
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)  # pyright: ignore[reportArgumentType]


def _latest(run_dir: Path) -> str | None:
    """The name `<run>/checkpoints/latest` holds (None without one); read without torch."""
    try:
        return (Path(run_dir) / CHECKPOINTS / "latest").read_text().strip() or None
    except OSError:
        return None


def _stopped_line(signame: str, before: str | None, after: str | None, started: bool = True) -> str:
    if after is not None and after != before:
        return f"stopped on {signame}: every rank wrote checkpoint {after} and exited 0 (resume with --resume auto)"
    kept = f"{after} is still the latest (resume with --resume auto)" if after else "this run has no checkpoint yet"
    when = "before the first step: no new checkpoint needed, every rank exited 0"
    if not started:
        when = "before any rank started: no new checkpoint needed"
    return f"stopped on {signame} {when}; {kept}"


def run_torchrun(cmd: list[str], env: dict[str, str] | None = None, run_dir: Path | None = None) -> int:
    """Run torchrun in its own session, its stop signals blocked until its agent takes them; forward
    every stop signal to it as SIGTERM; return its rc (0 after a clean stop, said in one line)."""
    with _Stops() as stops:
        return _run_torchrun(cmd, env, stops, run_dir)


def _run_torchrun(cmd: list[str], env: dict[str, str] | None, stops: _Stops, run_dir: Path | None) -> int:
    env = {**(os.environ if env is None else env), DIE_WITH_PARENT_ENV: "1"}
    before = _latest(run_dir) if run_dir is not None else None
    if stops.names:  # a stop before any rank started: nothing to start, nothing to save
        print(_stopped_line(stops.names[0], before, before, started=False), flush=True)
        return 0
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_start_blocked)
    forwarded = 0
    while True:
        try:
            rc = proc.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            pass
        if len(stops.names) > forwarded:  # each new signal, once: torchrun's agent passes it on
            forwarded = len(stops.names)
            _term(proc.pid)
    if stops.names:
        if rc == 0:
            after = _latest(run_dir) if run_dir is not None else None
            print(_stopped_line(stops.names[0], before, after), flush=True)
        else:
            print(
                f"error: stopped on {stops.names[0]}, but torchrun exited {rc}; see the rank errors above",
                file=sys.stderr,
                flush=True,
            )
    return rc


def _forward_stops(stop: threading.Event) -> None:
    """The agent's signal thread: every stop signal (blocked in all of the agent's threads) is taken
    here, outside any signal handler; from the first one on, every rank torchrun has started, or
    starts later, gets SIGTERM once."""
    me, signalled = os.getpid(), set()
    while True:
        if signal.sigtimedwait(STOP_SIGNALS, 0.05) is not None:
            stop.set()
        if stop.is_set():
            for child in _children(me):
                if child not in signalled:
                    signalled.add(child)
                    _term(child)


def agent(argv: list[str]) -> None:
    """torchrun's agent in this process, its failure reports cut to one line (the ranks print their own)."""
    # stop signals: blocked here (the launcher starts this process with them blocked already) and so
    # in every thread and rank started from here; `_forward_stops` takes them. torchrun's own handlers
    # (SignalException: traceback, exit 1) are limited to SIGQUIT.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    threading.Thread(target=_forward_stops, args=(threading.Event(),), daemon=True, name="osp-stop").start()

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    import logging

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its chatter; the outcome is said in one line below

    try:
        run(parse_args(["--signals-to-handle", "SIGQUIT", *argv]))
    except ChildFailedError as e:
        # a rank that exited with an error comes before ranks torchrun then stopped with a signal
        # (timestamps have whole-second resolution: ties are common)
        bad = sorted((f.exitcode < 0, f.timestamp, rank, f.exitcode) for rank, f in e.failures.items())
        _, _, rank, code = bad[0]
        lost = [f.message for f in e.failures.values() if f.exitcode == EXIT_PEER_LOST and f.message]
        if lost:  # the ranks said which peer went away; the node's own summary says it once more
            what = lost[0].split("; ", 1)[0]
            print(
                f"error: {what}; this node's ranks stopped (how to resume: their line above)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(
            f"error: rank {rank} failed first ({what}; its error is above); torchrun stopped the other ranks",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    except RendezvousError as e:  # elastic: too few nodes within the join timeout, an unreachable endpoint
        endpoint = argv[argv.index("--rdzv_endpoint") + 1] if "--rdzv_endpoint" in argv else "MASTER_ADDR:MASTER_PORT"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: the elastic rendezvous at {endpoint} failed ({first}); start at least MIN nodes with the same "
            "MASTER_ADDR/MASTER_PORT (MASTER_ADDR: the node that hosts the rendezvous), or raise parallel.init_timeout_s",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except SignalException as e:
        print(
            f"error: torchrun got {signal.Signals(e.sigval).name}; its ranks were stopped", file=sys.stderr, flush=True
        )
        sys.exit(128 + int(e.sigval))


def child_env(environ: Mapping[str, str], device_type: str) -> dict[str, str]:
    """The environment torchrun (and so every rank) starts with."""
    from osp.stage2_train.dist import accelerator_env

    env = dict(environ)
    for k, v in accelerator_env(device_type).items():
        env.setdefault(k, v)
    return env


def rendezvous(cfg: TrainConfig) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of the job: the launch keys, else the environment; port 0 = a free port
    chosen by torchrun (one node only)."""
    la = cfg.launch
    addr = la.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = la.master_port or int(os.environ.get("MASTER_PORT") or 0)
    if (la.nnodes > 1 or la.min_nodes) and not port:
        raise ConfigError(
            f"launch.nnodes={la.nnodes}: every node needs the same rendezvous port; pass --master-port PORT "
            "(MASTER_PORT=... for make train) on every node"
        )
    return addr, port


def torchrun_args(cfg: TrainConfig, addr: str, port: int) -> list[str]:
    """torchrun's arguments for this node: a fixed rendezvous when a port is given, else standalone."""
    la = cfg.launch
    where = (
        [
            "--nnodes",
            str(la.nnodes),
            "--node_rank",
            str(la.node_rank),
            "--master_addr",
            addr,
            "--master_port",
            str(port),
        ]
        if port
        else ["--standalone"]
    )
    timeout = f"timeout={int(cfg.parallel.init_timeout_s)}"
    if la.min_nodes:  # elastic: torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT, restarts on a change of nodes
        wait = la.join_wait_s
        conf = (
            f"join_timeout={int(cfg.parallel.init_timeout_s)},last_call_timeout={wait},"
            f"keep_alive_interval={max(1, min(5, wait))},keep_alive_max_attempt=3"
        )
        where = [
            "--nnodes",
            f"{la.min_nodes}:{la.nnodes}",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{addr}:{port}",
        ]
        where += ["--rdzv_id", f"osp-{cfg.run.path.name}", "--max_restarts", str(la.max_restarts)]
        return [*where, "--nproc_per_node", str(cfg.nproc), "--rdzv_conf", conf]
    return [*where, "--nproc_per_node", str(cfg.nproc), "--rdzv_conf", timeout]


def launch(cfg: TrainConfig, *, restart: bool = False) -> int:
    """Run `cfg` as this node's share of a torchrun job (cfg.nproc processes of cfg.world); returns the
    exit code. User errors before any rank starts raise OspError (RendezvousError: exit code 2)."""
    with _Stops() as stops:  # from here on a stop signal is recorded, never fatal
        return _launch(cfg, restart, stops)


def _launch(cfg: TrainConfig, restart: bool, stops: _Stops) -> int:
    from osp.common.rendezvous import precheck
    from osp.stage2_train.rundir import claim_run_dir

    la = cfg.launch
    addr, port = rendezvous(cfg)
    env = child_env(os.environ, _device_type(cfg.run.device))
    if la.min_nodes:  # elastic: any node may start the job; a node joining a live job leaves its folder alone
        check_elastic(cfg)
        check_resolves(addr, port)
        # torchrun's store shared between rounds publishes its address in the first round only, so a node
        # that joins later waits for it until the join timeout: a store per round instead
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        if not run_is_live(cfg.run.path) and (la.node_rank == 0 or not restart):
            claim_run_dir(cfg.run.path, cfg.run.resume, restart)
    else:
        if port:
            precheck(addr, port, la.node_rank, la.nnodes, min(la.precheck_timeout_s, cfg.parallel.init_timeout_s))
        if la.node_rank == 0:
            claim_run_dir(cfg.run.path, cfg.run.resume, restart)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here so it prints no banner about it
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's warnings with C++ stacks when a peer or the store is gone
    env[RESUME_ENV] = resume_command(sys.argv)
    with tempfile.TemporaryDirectory(prefix="osp-launch-") as tmp:
        resolved = Path(tmp) / "config.toml"
        resolved.write_text(cfg.to_toml())
        cmd = [
            sys.executable,
            "-m",
            "osp.stage2_train.launch",
            AGENT_FLAG,
            *torchrun_args(cfg, addr, port),
            "-m",
            "osp.stage2_train.run",
            str(resolved),
        ]
        sys.stdout.flush()
        return _run_torchrun(cmd, env, stops, cfg.run.path)


def check_resolves(addr: str, port: int) -> None:
    """MASTER_ADDR resolves: an elastic job's pre-check (its nodes may come later, or not all of them)."""
    import socket

    from osp.common.rendezvous import RendezvousError

    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(
            f"MASTER_ADDR={addr!r} does not resolve ({e.strerror}); set it to the node that hosts the rendezvous"
        ) from None


def resume_command(argv: list[str]) -> str:
    """This launcher's command line as the one that resumes the run: --restart and any --resume /
    run.resume dropped, --resume auto added."""
    out, skip = ["osp"], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif a != "--restart" and not a.startswith(("--resume=", "run.resume=")):
            out.append(a)
    return shlex.join([*out, "--resume", "auto"])


def _device_type(device: str) -> str:
    from osp.common.device import pick_device

    return pick_device(None if device == "auto" else device).type


if __name__ == "__main__":
    if sys.argv[1:2] != [AGENT_FLAG]:
        sys.exit("error: start training with `osp train` (this module runs torchrun's agent for it)")
    agent(sys.argv[2:])
