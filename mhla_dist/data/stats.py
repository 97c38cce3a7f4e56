"""Bad-data accounting: what was skipped, where, and why.

Decoding errors happen inside DataLoader worker processes; each worker records them as
`BadDataEvent`s and ships them to the main process with the next batch, so
`loader.stats` counts every worker's skips (and a resumed run does not count twice the
skips it replays while fast-forwarding).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RECENT_EVENTS = 20


class NoValidDataError(RuntimeError):
    """Raised when a whole share of an epoch yields no valid sample (the data is broken)."""


@dataclass(frozen=True)
class BadDataEvent:
    """One skipped sample (`key` set) or one unreadable shard (`key` is None)."""

    shard: str
    key: str | None
    error: str

    def describe(self) -> str:
        where = f"sample {self.key!r} of shard {self.shard}" if self.key else f"shard {self.shard}"
        return f"{where}: {self.error}"


def report_bad_sample(events: list[BadDataEvent], shard: str, key: str, exc: BaseException) -> None:
    event = BadDataEvent(shard, key, f"{type(exc).__name__}: {exc}")
    log.warning("skipping corrupt %s", event.describe())
    events.append(event)


def report_bad_shard(events: list[BadDataEvent], shard: str, exc: BaseException) -> None:
    event = BadDataEvent(shard, None, f"{type(exc).__name__}: {exc}")
    log.warning("unreadable %s (the rest of it is skipped)", event.describe())
    events.append(event)


@dataclass
class DataStats:
    """Counters over every batch the loader handed out (all workers)."""

    batches: int = 0
    rows: int = 0
    skipped_samples: int = 0
    bad_shards: int = 0
    recent: deque[BadDataEvent] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))

    def add_events(self, events: list[BadDataEvent]) -> None:
        for event in events:
            if event.key is None:
                self.bad_shards += 1
            else:
                self.skipped_samples += 1
            self.recent.append(event)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "skipped_samples": self.skipped_samples,
            "bad_shards": self.bad_shards,
            "recent": [[e.shard, e.key, e.error] for e in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self.rows = int(state["rows"])
        self.skipped_samples = int(state["skipped_samples"])
        self.bad_shards = int(state["bad_shards"])
        self.recent = deque((BadDataEvent(*e) for e in state["recent"]), maxlen=RECENT_EVENTS)
