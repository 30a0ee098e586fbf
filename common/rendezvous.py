"""Rendezvous pre-check of a multi-process / multi-node job, before torchrun binds anything.

Within a short timeout, one line naming what is missing: MASTER_ADDR resolves; on NODE_RANK 0 it is
an address of this machine and MASTER_PORT is free; every node reaches a small TCP store on
MASTER_ADDR:MASTER_PORT and node 0 sees all NNODES nodes (the line names the NODE_RANKs that did not
come). Used by `osp train` (stage 2's launcher) and by `osp precheck` before `make encode`'s torchrun.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import NoReturn

from osp.common.errors import OspError

_PRECHECK = "osp-precheck"


class RendezvousError(OspError, RuntimeError):
    """A node, address or port of the rendezvous is missing or wrong (one line: which, and the fix)."""


def _fail(msg: str) -> NoReturn:
    raise RendezvousError(msg)


def precheck(addr: str, port: int, node_rank: int, nnodes: int, timeout: float) -> None:
    """MASTER_ADDR/MASTER_PORT (`check_master`), then every node present (`check_nodes`)."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        _fail(f"NODE_RANK={node_rank} must be in [0, NNODES={nnodes})")
    check_master(addr, port, node_rank, nnodes, timeout)
    check_nodes(addr, port, node_rank, nnodes, timeout)


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
                    "same NNODES/MASTER_ADDR/MASTER_PORT, or raise launch.precheck_timeout_s"
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
