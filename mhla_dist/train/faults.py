"""Fault injection: a testing aid for the reliability tests, off unless asked for.

    MHLA_FAULT="kill@1:5"            rank 1 SIGKILLs itself as step 5 begins (a crashed node)
    MHLA_FAULT="sigterm@0:3"         rank 0 sends itself SIGTERM as step 3 begins (preemption)
    MHLA_FAULT="stall@1:4"           rank 1 sleeps as step 4 begins, for good (a hang)
    MHLA_FAULT="save_error@1:4"      rank 1 raises OSError while writing the step-4 checkpoint
    MHLA_FAULT="kill@1:5,stall@0:9"  several, comma-separated

`RANK` is the global rank, `STEP` the step about to run (1-based) or the step a checkpoint
is saved at. A fault fires once per job: not again in workers that torchrun restarted
(`TORCHELASTIC_RESTART_COUNT` > 0), so a restarted run can get past it. The checks are one
comparison per step when no fault is set.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger("mhla_dist.train")
ENV = "MHLA_FAULT"
KINDS = ("kill", "sigterm", "stall", "save_error")


class InjectedFault(OSError):
    """What `save_error` raises (an OSError, like a full disk)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            kind, where = item.split("@")
            rank, step = (int(x) for x in where.split(":"))
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: {item!r} is not KIND@RANK:STEP "
                             f"(KIND one of {', '.join(KINDS)})") from None
        if kind not in KINDS:
            raise ValueError(f"{ENV}={text!r}: fault kind {kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        faults.append(Fault(kind, rank, step))
    return faults


class FaultInjector:
    def __init__(self, rank: int, text: str | None = None) -> None:
        text = os.environ.get(ENV, "") if text is None else text
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.faults = [] if restarted else [f for f in parse_faults(text) if f.rank == rank]
        if self.faults:
            log.warning("fault injection on rank %d: %s", rank, self.faults)

    def _due(self, kinds: tuple[str, ...], step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind in kinds and f.step == step]

    def at_step(self, step: int) -> None:
        """Before step `step` runs."""
        if not self.faults:
            return
        for f in self._due(("kill", "sigterm", "stall"), step):
            log.warning("injected fault: %s at step %d", f.kind, step)
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                while True:
                    time.sleep(3600)

    def at_save(self, step: int) -> None:
        """While this rank writes the checkpoint of step `step`."""
        if self._due(("save_error",), step):
            raise InjectedFault(f"injected save_error at step {step} ({ENV})")
