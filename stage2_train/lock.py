"""The run-directory lock: one job writes a run directory at a time.

Rank 0 takes an exclusive `flock` on `<run>/.lock` before anything is written and holds it for the
life of the process. The kernel drops the lock when the process dies, however it dies, so a killed
job never leaves it stale; the file's text (pid, host, start time) only serves the error message.
All ranks agree on the outcome, so a second job stops on every rank with one line.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from osp.common.errors import OspError

LOCK_NAME = ".lock"


class RunLockedError(OspError):
    """Another live job holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: in use by another training job ({holder}); wait for it to finish or stop it, "
                "or train into a new run (run.name=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}".encode(), 0
        )
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    __del__ = release


def take_run_lock(run_dir: str | os.PathLike, is_main: bool) -> RunLock | None:
    """Rank 0 locks `run_dir`; every rank raises RunLockedError when it could not (collective)."""
    import torch.distributed as dist

    lock, message = None, ""
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            message = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, message)
        message = next((m for m in found if m), "")
    if message:
        raise RunLockedError(message)
    return lock
