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
  * on SIGTERM/SIGINT/SIGHUP forwards SIGTERM to the ranks only: they checkpoint at the next step
    boundary and exit 0, torchrun exits 0, and the launcher prints one line and exits 0;
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
from collections.abc import Mapping
from pathlib import Path

import psutil  # imported here, not in a signal handler (a second signal must not meet a half-imported module)

from osp.common.errors import ConfigError
from osp.common.process import DIE_WITH_PARENT_ENV, set_parent_death_signal
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.elastic import EXIT_PEER_LOST, RESUME_ENV, check_elastic, run_is_live

AGENT_FLAG = "--torchrun"  # python -m osp.stage2_train.launch --torchrun <torchrun arguments>: the agent


def _children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def _term_children(pid: int) -> None:
    """SIGTERM to the direct children of `pid` (the ranks, seen from torchrun's agent)."""
    for child in _children(pid):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _set_pdeathsig() -> None:  # preexec_fn of torchrun: it dies with the launcher
    set_parent_death_signal(signal.SIGKILL)


def run_torchrun(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run torchrun in its own session; forward a stop signal to its ranks as SIGTERM; return its rc."""
    env = {**(os.environ if env is None else env), DIE_WITH_PARENT_ENV: "1"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None
    )
    stopping: list[str] = []

    def on_signal(signum, _frame):
        if not stopping:
            stopping.append(signal.Signals(signum).name)
        _term_children(proc.pid)  # the ranks; torchrun itself would answer with a traceback

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    while True:
        try:
            rc = proc.wait()
            break
        except InterruptedError:
            continue
    if stopping:
        if rc == 0:
            print(
                f"stopped on {stopping[0]}: every rank wrote its checkpoint and exited 0 (resume with --resume auto)",
                flush=True,
            )
        else:
            print(
                f"error: stopped on {stopping[0]}, but torchrun exited {rc}; see the rank errors above",
                file=sys.stderr,
                flush=True,
            )
    return rc


def agent(argv: list[str]) -> None:
    """torchrun's agent in this process, its failure reports cut to one line (the ranks print their own)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    import logging

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its chatter; the outcome is said in one line below

    # A stop signal that reaches the agent too (a scheduler signalling every process of the job) is
    # passed to the ranks as SIGTERM, instead of torchrun's SignalException (traceback, exit 1): the
    # ranks checkpoint and exit 0, so the agent does too.

    def forward(_signum, _frame):
        _term_children(os.getpid())

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    try:
        run(parse_args(["--signals-to-handle", "SIGQUIT", *argv]))  # SIGTERM/INT/HUP: `forward` above
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
        return run_torchrun(cmd, env)


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
