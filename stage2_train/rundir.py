"""A run directory is never silently reused.

A new run (run.resume = "") into a folder that already holds checkpoints is refused with one line
that offers the three ways on: `--resume auto` (continue it), a new run name, or `--restart` (the old
run is moved aside to `<run>.old-<timestamp>`, under the run lock so a live job is never moved).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from osp.common.errors import ConfigError, OspError

CHECKPOINTS = "checkpoints"  # <run>/checkpoints (osp.stage2_train.checkpoint.Checkpointer writes there)


class RunExistsError(OspError):
    """A new run was asked for in a folder that holds an earlier run's checkpoints."""


def checkpoints_of(run_dir: Path) -> list[str]:
    """Names in `<run>/checkpoints` (step folders, `latest`), hidden temporaries left out."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def aside_name(run_dir: Path, now: float | None = None) -> Path:
    """`<run>.old-YYYYmmdd-HHMMSS` (with -2, -3, ... when that exists already)."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 2
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    return dest


def claim_run_dir(run_dir: Path, resume: str, restart: bool, say: Callable[[str], None] = print) -> Path | None:
    """Check that a new run may use `run_dir`; with `restart`, move an earlier run aside first.
    Returns where the earlier run went (None when nothing moved). Call once per job (rank 0 / node 0)."""
    run_dir = Path(run_dir)
    if restart and resume:
        raise ConfigError(
            f"--restart starts {run_dir} again from step 0, --resume {resume} continues it; pass one of them"
        )
    if resume:
        return None
    found = checkpoints_of(run_dir)
    if not found:
        return None
    if not restart:
        latest = run_dir / CHECKPOINTS / "latest"
        what = f"latest {latest.read_text().strip()}" if latest.is_file() else ", ".join(found[:3])
        raise RunExistsError(
            f"{run_dir}: holds checkpoints of an earlier run ({what}); pass --resume auto to continue it, "
            "a new run name (run.name=... or run.dir=...) to keep it, or --restart to move it aside and start again"
        )
    from osp.stage2_train.lock import RunLock

    lock = RunLock(run_dir).acquire()  # a live job holds it: RunLockedError, nothing moves
    try:
        dest = aside_name(run_dir)
        run_dir.rename(dest)
    finally:
        lock.release()
    say(f"--restart: moved the earlier run {run_dir} to {dest}")
    return dest
