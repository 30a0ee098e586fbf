"""Multi-process / multi-node launch: check MASTER_ADDR first, then hand over to torchrun.

    python -m osp.stage2_train.launch --nnodes 2 --node_rank 0 --nproc_per_node 8 \
        --master_addr 10.0.0.1 --master_port 29512 -- --config my.toml --resume auto

torchrun's own rendezvous waits up to its timeout (10 min by default) and then prints a long trace when
MASTER_ADDR is wrong. Before starting it this wrapper checks, within `--rdzv_timeout` seconds:
  * MASTER_ADDR resolves;
  * on NODE_RANK 0 (the node that hosts the rendezvous store): MASTER_ADDR is an address of this machine;
  * on every other node: MASTER_ADDR:MASTER_PORT accepts a TCP connection (node 0 is up);
and fails with one line naming the address and the fix. torchrun then gets the same timeout.

torchrun runs in this process: when a rank fails, its own message (one line for a user error, a
traceback for a bug) is already on stderr, so the launcher adds one line (rank, exit code) instead
of torchrun's traceback block.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import NoReturn


def _fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_master(addr: str, port: int, node_rank: int, nnodes: int, timeout: float) -> None:
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        _fail(f"MASTER_ADDR={addr!r} does not resolve ({e.strerror}); set MASTER_ADDR to the IP of the NODE_RANK=0 node")
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
        f"NODE_RANK={node_rank}: could not reach MASTER_ADDR={addr}:{port} within {timeout:.0f} s ({last}); "
        "start NODE_RANK=0 first (or together), and check MASTER_ADDR/MASTER_PORT and the firewall"
    )


def _own_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, run_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python -m osp.stage2_train.launch")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("NNODES", 1)))
    p.add_argument("--node_rank", type=int, default=int(os.environ.get("NODE_RANK", 0)))
    p.add_argument("--nproc_per_node", type=int, default=int(os.environ.get("GPUS_PER_NODE") or os.environ.get("NPUS_PER_NODE") or 2))
    p.add_argument("--master_addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master_port", type=int, default=int(os.environ.get("MASTER_PORT", 29512)))
    p.add_argument("--rdzv_timeout", type=float, default=float(os.environ.get("OSP_RDZV_TIMEOUT", 300)))
    a = p.parse_args(argv)
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        _fail(f"NODE_RANK={a.node_rank} must be in [0, NNODES={a.nnodes})")
    check_master(a.master_addr, a.master_port, a.node_rank, a.nnodes, a.rdzv_timeout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here so it prints no banner about it
    cmd = [
        "--nnodes", str(a.nnodes), "--node_rank", str(a.node_rank), "--nproc_per_node", str(a.nproc_per_node),
        "--master_addr", a.master_addr, "--master_port", str(a.master_port),
        "--rdzv_conf", f"timeout={int(a.rdzv_timeout)}",
        "-m", "osp.stage2_train.run",
        *run_args, f"parallel.init_timeout_s={a.rdzv_timeout}",
    ]
    sys.stdout.flush()
    sys.exit(_torchrun(cmd))


def _torchrun(cmd: list[str]) -> int:
    """torchrun's `run` with its arguments; a failed rank becomes one line and its exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's agent logs each failed rank as a multi-line record; the ranks' own stderr says why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(cmd))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code > 0 else f"signal {-code}"
        print(f"error: training failed on rank {rank} ({how}); its message is above", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    main()
