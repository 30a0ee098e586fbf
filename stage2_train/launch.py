"""Multi-process / multi-node launch: pre-check the rendezvous, then run torchrun as a child it owns.

    python -m osp.stage2_train.launch --nnodes 2 --node_rank 0 --nproc_per_node 8 \
        --master_addr 10.0.0.1 --master_port 29512 -- --config my.toml --resume auto

torchrun alone waits silently for its whole rendezvous timeout and then prints a long trace when a
node is missing, dies with a traceback on SIGTERM, and leaves its ranks running when it is killed
(each rank is in its own session). This wrapper:
  * pre-checks within `--precheck_timeout` seconds (short default) and fails with one line naming
    what is missing: MASTER_ADDR resolves; on NODE_RANK 0 it is an address of this machine and
    MASTER_PORT is free; every node reaches a small TCP store on MASTER_ADDR:MASTER_PORT and node 0
    sees all NNODES nodes (the line names the NODE_RANKs that did not come);
  * runs torchrun in its own session with a parent-death signal, and every rank (and loader worker)
    sets one too (`osp.common.process.die_with_parent`): however the launcher dies, kill -9 included, the job dies;
  * on SIGTERM/SIGINT/SIGHUP forwards SIGTERM to the ranks only: they checkpoint at the next step
    boundary and exit 0, torchrun exits 0, and the launcher prints one line and exits 0;
  * when a rank fails, its own message (one line for a user error, a traceback for a bug) is already
    on stderr, so torchrun's traceback block is replaced by one line (rank, exit code).
`--rdzv_timeout` bounds torchrun's own rendezvous and the ranks' process-group setup.

On accelerators the ranks also get CUDA_DEVICE_MAX_CONNECTIONS=1 (`dist.accelerator_env`; a value
already in the environment wins): megatron's sequence-parallel communication overlap needs it set
before any device context exists, i.e. before torchrun starts the ranks.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import NoReturn

from osp.common.process import DIE_WITH_PARENT_ENV, set_parent_death_signal

_PRECHECK = "osp-precheck"


def _fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _port_in_use(addr: str, port: int) -> str | None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_master(addr: str, port: int, node_rank: int, nnodes: int, timeout: float) -> None:
    """Resolve MASTER_ADDR; on node 0 it must be local and MASTER_PORT free; other nodes must reach it."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        _fail(
            f"MASTER_ADDR={addr!r} does not resolve ({e.strerror}); set MASTER_ADDR to the IP of the NODE_RANK=0 node"
        )
    if node_rank == 0:
        family, _, _, _, sockaddr = infos[0]
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
        except OSError:
            _fail(
                f"MASTER_ADDR={addr} is not an address of this machine, but NODE_RANK=0 hosts the rendezvous; "
                f"on NODE_RANK=0 set MASTER_ADDR to this node's own IP ({_own_ip()}) and use that same value on every node"
            )
        busy = _port_in_use(str(sockaddr[0]), port)  # the host of an AF_INET/AF_INET6 address
        if busy:
            _fail(
                f"MASTER_PORT={port} on {addr} is busy ({busy}; another job?); pick a free port, e.g. MASTER_PORT={port + 1}"
            )
        return
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(0.5)
    _fail(
        f"NODE_RANK={node_rank}: could not reach MASTER_ADDR={addr}:{port} within {timeout:g} s ({last}); "
        "start NODE_RANK=0 first (or together), and check MASTER_ADDR/MASTER_PORT and the firewall"
    )


def check_nodes(addr: str, port: int, node_rank: int, nnodes: int, timeout: float) -> None:
    """Every node checks in at a TCP store on MASTER_ADDR:MASTER_PORT (hosted by node 0, closed again
    before torchrun binds the port); node 0 names the NODE_RANKs that do not come within `timeout`."""
    if nnodes == 1:
        return
    import torch.distributed as dist

    t0 = time.monotonic()
    wait = timedelta(seconds=max(1.0, timeout))
    try:
        # TCPStore is documented public torch.distributed API; torch's stubs only omit it from the exports
        store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
            addr, port, nnodes, node_rank == 0, timeout=wait, wait_for_workers=False
        )
    except (RuntimeError, OSError) as e:
        if node_rank == 0:
            _fail(
                f"MASTER_PORT={port} on {addr}: cannot host the rendezvous ({str(e).splitlines()[0]}); pick a free MASTER_PORT"
            )
        _fail(
            f"NODE_RANK={node_rank}: could not reach the rendezvous at MASTER_ADDR={addr}:{port} within {timeout:g} s; "
            "start NODE_RANK=0 first (or together) with the same MASTER_ADDR/MASTER_PORT"
        )
    store.set(f"{_PRECHECK}/node{node_rank}", socket.gethostname())
    if node_rank == 0:
        while True:
            here = [r for r in range(nnodes) if store.check([f"{_PRECHECK}/node{r}"])]
            if len(here) == nnodes:
                break
            if time.monotonic() - t0 > timeout:
                missing = [r for r in range(nnodes) if r not in here]
                _fail(
                    f"NNODES={nnodes}: NODE_RANK {', '.join(map(str, missing))} did not reach the rendezvous at "
                    f"{addr}:{port} within {timeout:g} s (present: {', '.join(map(str, here))}); start every node with the "
                    "same NNODES/MASTER_ADDR/MASTER_PORT, or raise --precheck_timeout (OSP_PRECHECK_TIMEOUT)"
                )
            time.sleep(0.2)
        store.set(f"{_PRECHECK}/all", "1")
        store.wait([f"{_PRECHECK}/done{r}" for r in range(1, nnodes)], timedelta(seconds=30))
    else:
        try:
            store.wait([f"{_PRECHECK}/all"], timedelta(seconds=max(1.0, timeout - (time.monotonic() - t0)) + 5))
        except RuntimeError:
            _fail(
                f"NODE_RANK={node_rank}: the other nodes did not all come within {timeout:g} s (NODE_RANK 0 says which); "
                "start every node with the same NNODES/MASTER_ADDR/MASTER_PORT"
            )
        store.set(f"{_PRECHECK}/done{node_rank}", "1")
    del store
    if node_rank == 0:  # the server socket closes with the store; torchrun binds the port next
        deadline = time.monotonic() + 10
        while _port_in_use(addr, port) and time.monotonic() < deadline:
            time.sleep(0.1)


def _own_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _children(pid: int) -> list[int]:
    import psutil

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
        what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(
            f"error: rank {rank} failed first ({what}; its error is above); torchrun stopped the other ranks",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
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


def _device_type() -> str:
    from osp.common.device import pick_device

    try:
        return pick_device(os.environ.get("OSP_DEVICE")).type
    except (RuntimeError, ValueError) as e:
        _fail(f"{e}")
        raise


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--torchrun"]:
        return agent(argv[1:])
    run_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, run_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python -m osp.stage2_train.launch")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("NNODES", 1)))
    p.add_argument("--node_rank", type=int, default=int(os.environ.get("NODE_RANK", 0)))
    p.add_argument(
        "--nproc_per_node",
        type=int,
        default=int(os.environ.get("GPUS_PER_NODE") or os.environ.get("NPUS_PER_NODE") or 2),
    )
    p.add_argument("--master_addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master_port", type=int, default=int(os.environ.get("MASTER_PORT", 29512)))
    p.add_argument("--rdzv_timeout", type=float, default=float(os.environ.get("OSP_RDZV_TIMEOUT", 300)))
    p.add_argument(
        "--precheck_timeout",
        type=float,
        default=float(os.environ.get("OSP_PRECHECK_TIMEOUT", 60)),
        help="seconds every node may take to reach the rendezvous pre-check (short: a missing node is named early)",
    )
    p.add_argument(
        "--precheck_only", action="store_true", help="run the pre-checks and exit (used before other torchrun jobs)"
    )
    a = p.parse_args(argv)
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        _fail(f"NODE_RANK={a.node_rank} must be in [0, NNODES={a.nnodes})")
    pre = min(a.precheck_timeout, a.rdzv_timeout)
    check_master(a.master_addr, a.master_port, a.node_rank, a.nnodes, pre)
    check_nodes(a.master_addr, a.master_port, a.node_rank, a.nnodes, pre)
    if a.precheck_only:
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here so it prints no banner about it
    cmd = [
        sys.executable,
        "-m",
        "osp.stage2_train.launch",
        "--torchrun",
        "--nnodes",
        str(a.nnodes),
        "--node_rank",
        str(a.node_rank),
        "--nproc_per_node",
        str(a.nproc_per_node),
        "--master_addr",
        a.master_addr,
        "--master_port",
        str(a.master_port),
        "--rdzv_conf",
        f"timeout={int(a.rdzv_timeout)}",
        "-m",
        "osp.stage2_train.run",
        *run_args,
        f"parallel.init_timeout_s={a.rdzv_timeout}",
    ]
    env = child_env(os.environ, _device_type())
    sys.stdout.flush()
    sys.exit(run_torchrun(cmd, env))


if __name__ == "__main__":
    main()
