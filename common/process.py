"""Process lifetime under the launcher: a rank (stage 1 or stage 2) and its loader workers die with
their parent, however the parent dies (kill -9 included).

The launcher sets OSP_DIE_WITH_PARENT for the processes below it and gives torchrun a parent-death
signal; each process below calls `die_with_parent()` once it runs. Linux only (prctl
PR_SET_PDEATHSIG); elsewhere, and outside the launcher, it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
DIE_WITH_PARENT_ENV = "OSP_DIE_WITH_PARENT"  # set by the launcher for the processes below it


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent exits."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Under the launcher (OSP_DIE_WITH_PARENT set) on Linux: get `sig` when the parent exits, and exit
    now if the parent is already gone. A no-op elsewhere."""
    if not os.environ.get(DIE_WITH_PARENT_ENV) or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    set_parent_death_signal(sig)
    if os.getppid() != parent or parent == 1:  # the parent died before the prctl took effect
        os._exit(1)
