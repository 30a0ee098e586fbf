"""The step watchdog: a rank whose training makes no progress for `run.watchdog_s` seconds stops.

The train loop calls `beat(where)` at each point where it may wait (the data loader, the step's
collectives, a checkpoint write). A daemon thread checks the time since the last beat; past the
limit it writes one line naming the rank, where it waits and for how long, and ends the process
(exit code 3): a rank blocked in a collective cannot be unwound from another thread, and a hung job
otherwise holds every accelerator of the job until a person notices. 0 turns the watchdog off.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_CODE = 3


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = float(timeout_s), rank
        self.where, self.last = "starting", time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="osp-watchdog", daemon=True)
            self._thread.start()

    def beat(self, where: str) -> None:
        self.where, self.last = where, time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.05, self.timeout_s / 4))):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                sys.stderr.write(
                    f"error (rank {self.rank}): no progress for {idle:.0f} s while {self.where} (run.watchdog_s={self.timeout_s:g}); "
                    "another rank or node has stopped or hangs (see its error), or raise run.watchdog_s if steps are that slow\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_CODE)
