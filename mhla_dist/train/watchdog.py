"""A step watchdog: a rank whose step runs past `train.timeout_s` dumps every thread's
Python stack and exits, so a stalled rank (in a collective, in its data loader) fails the
job within the timeout instead of holding the cluster.

The process group is created with the same timeout, so collectives waiting on a stalled
peer fail too; the watchdog also covers what no collective sees (a loader that never
returns, a rank stuck before its first collective). Every rank runs one: the stalled rank
and the ranks waiting for it all exit, each with its own stacks on stderr.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger("mhla_dist.train")
EXIT_HUNG = 124  # as coreutils' timeout


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._step, self._since = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """Step `step` begins (or the loop made progress within it)."""
        self._step, self._since = step, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(max(self.timeout_s / 10, 0.1), 5.0)
        while not self._stop.wait(poll):
            waited = time.monotonic() - self._since
            if waited > self.timeout_s:
                message = (f"rank {self.rank}: step {self._step} has run {waited:.0f} s, past "
                           f"train.timeout_s={self.timeout_s:g} (a stalled rank: in a "
                           "collective or its data loader); every thread's stack follows")
                log.error("%s", message)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)
