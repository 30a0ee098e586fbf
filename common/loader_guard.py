"""Data-loader workers that fail stop the job with one line, never a hang.

A torch DataLoader worker hands each result to a background feeder thread, which moves the result's
tensors into shared memory (/dev/shm) while pickling them. When that allocation fails (a full
/dev/shm, the small default shm size of containers; or a file-size limit), the feeder thread prints
a traceback and drops the result: the worker lives on and the main process waits for it forever.
`share_in_worker` therefore moves a result's tensors into shared memory in the worker itself, where
a failure is an exception that the DataLoader delivers to the main process (the feeder then finds
the storage already shared and only sends its handle: no extra copy).

A worker that dies (SIGKILL from the out-of-memory killer, SIGBUS on a full /dev/shm, a crash) is
reported by torch as a RuntimeError, either from the iterator (its periodic liveness check) or from
its SIGCHLD handler, at whatever line the main thread is running. `loader_error` turns those into one
`LoaderWorkerError` line; `watch_workers` wraps torch's SIGCHLD handler so that its error is that
line too. The stage says how its workers are switched off and how a run resumes (`WorkerFix`).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import threading
import time
from typing import Any

import torch

from osp.common.errors import OspError, one_line
from osp.common.shards import human_bytes

SHM_DIR = "/dev/shm"


class LoaderWorkerError(OspError, RuntimeError):
    """A data-loader worker failed or died (message: the cause and the fix)."""


@dataclasses.dataclass(frozen=True)
class WorkerFix:
    """How the user of one stage turns the workers off and goes on after the stop."""

    no_workers: str  # e.g. "set data.num_workers=0"
    rerun: str  # e.g. "resume with --resume auto"


def shm_message(reason: str, fix: WorkerFix) -> str:
    try:
        free = f"{human_bytes(shutil.disk_usage(SHM_DIR).free)} free on {SHM_DIR}"
    except OSError:
        free = f"no {SHM_DIR}"
    return (
        f"a data-loader worker could not allocate shared memory to hand its data to the main process ({reason}; {free}); raise the "
        f"shared memory of the container (e.g. docker run --shm-size=8g, or --ipc=host) or {fix.no_workers} "
        f"(loading then runs in the main process), then {fix.rerun}"
    )


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def share_in_worker(obj: Any, fix: WorkerFix) -> Any:
    """Inside a DataLoader worker: move the CPU tensors of `obj` into shared memory now, raising
    `LoaderWorkerError` (delivered to the main process) when that fails. Elsewhere: `obj` unchanged."""
    if torch.utils.data.get_worker_info() is None:
        return obj
    for t in _tensors(obj):
        if t.device.type != "cpu" or t.is_shared():
            continue
        try:
            t.share_memory_()
        except RuntimeError as e:  # "unable to resize file </torch_...> ...: File too large", "No space left ..."
            raise LoaderWorkerError(shm_message(one_line(e), fix)) from None
    return obj


_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]+)\.")
_EXITED = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_GONE = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
_TIMEOUT = re.compile(r"DataLoader timed out after (\d+) seconds")


def _died(pid: int | str, how: str, fix: WorkerFix) -> LoaderWorkerError:
    """`how`: a signal name ("Killed", "SIGKILL", "Bus error") or "exit code N"."""
    if "Bus error" in how or "SIGBUS" in how:  # pages of a full /dev/shm touched
        return LoaderWorkerError(shm_message(f"worker pid {pid} killed by SIGBUS", fix))
    if how.startswith("exit code"):
        return LoaderWorkerError(
            f"a data-loader worker (pid {pid}) exited with {how}; {fix.no_workers} to see the error in the main "
            f"process, then {fix.rerun}"
        )
    if how in ("Killed", "SIGKILL"):
        return LoaderWorkerError(
            f"a data-loader worker (pid {pid}) was killed by signal {how} (often the kernel's out-of-memory killer, "
            f"see dmesg); give the job more memory or {fix.no_workers}, then {fix.rerun}"
        )
    return LoaderWorkerError(
        f"a data-loader worker (pid {pid}) was killed by signal {how}; {fix.no_workers} to see the error in the "
        f"main process, then {fix.rerun}"
    )


def _dead_worker(workers, fix: WorkerFix) -> LoaderWorkerError | None:
    """How the first dead one of `workers` died; None when all live (waits up to 5 s: a dying worker
    closes its sockets a moment before it can be reaped)."""
    deadline = time.monotonic() + 5.0
    while workers:
        for w in workers:
            if not w.is_alive():  # (reaps it: exitcode is set)
                code = w.exitcode
                how = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
                return _died(w.pid, how, fix)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return None


def loader_error(e: BaseException, fix: WorkerFix, workers=()) -> LoaderWorkerError | None:
    """The one-line error for a loader failure that reached the main process; None for anything else.
    `workers`: the iterator's worker processes (a batch whose worker died while handing it over fails
    with a connection error; a dead worker among them makes that a loader failure)."""
    if isinstance(e, LoaderWorkerError):  # raised in a worker: arrives as "Caught ...\nOriginal Traceback ..."
        return LoaderWorkerError(one_line(e))
    if isinstance(e, (ConnectionError, EOFError)):
        return _dead_worker(workers, fix)
    if not isinstance(e, RuntimeError):
        return None
    msg = str(e)
    if m := _KILLED.search(msg):
        return _died(m.group(1), m.group(2).strip(), fix)
    if m := _EXITED.search(msg):
        return _died(m.group(1), f"exit code {m.group(2)}", fix)
    if m := _GONE.search(msg):
        return _dead_worker(workers, fix) or LoaderWorkerError(
            f"data-loader worker(s) (pid {m.group(1)}) died unexpectedly; {fix.no_workers} to see the cause in "
            f"the main process, then {fix.rerun}"
        )
    if m := _TIMEOUT.search(msg):
        return LoaderWorkerError(
            f"no batch came from the data-loader workers in {m.group(1)} s; {fix.no_workers} to see where "
            f"loading stalls, then {fix.rerun}"
        )
    return None


_FIX: list[WorkerFix | None] = [None]


def watch_workers(fix: WorkerFix) -> None:
    """Make the error that torch's SIGCHLD handler raises for a dead worker a `LoaderWorkerError` line.
    Call in the main thread right after a DataLoader with workers started them (torch installs its
    handler then, once per process); a no-op elsewhere or when no handler is installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    _FIX[0] = fix
    previous = signal.getsignal(signal.SIGCHLD)
    if getattr(previous, "osp_loader_guard", False) or not callable(previous):
        return

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as e:
            err = loader_error(e, _FIX[0] or fix)
            if err is None:
                raise
            raise err from None

    handler.osp_loader_guard = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, handler)
