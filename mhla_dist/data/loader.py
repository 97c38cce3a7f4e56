"""`StreamingLoader`: DP-split, multi-worker, resumable batches from tar shards.

How batches flow. With `num_workers = W > 0` a torch `DataLoader` runs W processes; each is
a *logical worker* that produces whole batches of its own deterministic stream
(`stream.py`), epoch after epoch. The loader hands batches out in a fixed order,
round-robin over the logical workers (a worker whose stream ended drops out), buffering
any batch that arrives early. `num_workers = 0` is one logical worker in-process.

Resume state (`state_dict()`): for each logical worker the epoch it is in and how many
batches of that epoch were handed out (plus rows, for layout changes), which worker is
next, and the bad-data counters. `load_state_dict()` on the same layout (dp_size,
num_workers, batch shape, seed, shards) makes the next batches identical to an
uninterrupted run: each worker regenerates its current epoch and drops the batches
already given (decoding is replayed, so a resume costs at most one epoch share per
worker; bad samples met again are not counted twice).

A different layout (another DP size, worker count or batch size) cannot replay the same
stream. The loader then keeps the *global sample count*: it restarts at the earliest
epoch any worker was in and has every new worker skip its share of the samples the old
layout had consumed of that epoch (`rows * old_dp_size`, split evenly). Which samples
are skipped differs from those actually seen, so in that one epoch some samples repeat
and as many are missed; later epochs are exact for the new layout. A warning says so.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mhla_dist.data.shards import RawSample, expand_urls
from mhla_dist.data.stats import BadDataEvent, DataStats
from mhla_dist.data.stream import epoch_shards, worker_epoch_samples

log = logging.getLogger(__name__)

STATE_VERSION = 1


class BatchSource(Protocol):
    """What turns decoded samples into batches (LM windows, video clips)."""

    batch_size: int

    def decode(self, shard: str, key: str, files: RawSample) -> Any: ...

    def batches(self, samples: Iterator[Any]) -> Iterator[tuple[int, Any]]:
        """Yield `(rows, payload)`; `build(payload)` makes the tensors (skipped on replay)."""
        ...

    def build(self, payload: Any) -> dict[str, Any]: ...

    def layout(self) -> dict[str, Any]: ...


@dataclass
class WorkerPosition:
    epoch: int = 0
    index: int = 0  # batches of `epoch` handed out
    rows: int = 0  # rows of `epoch` handed out
    prev_rows: int = 0  # rows of the epoch before (for layout changes)
    done: bool = False


class _WorkerStreams(IterableDataset):
    """Pickled into each DataLoader process; process k plays logical worker (cursor+k) % W."""

    def __init__(self, loader: StreamingLoader, positions: list[WorkerPosition], cursor: int):
        self.loader, self.positions, self.cursor = loader, positions, cursor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k = info.id if info is not None else 0
        logical = (self.cursor + k) % len(self.positions)
        return self.loader._worker_stream(logical, self.positions[logical])


class StreamingLoader:
    """Batches for one DP rank; iterate it, checkpoint it with `state_dict()`.

    `num_epochs=None` streams forever (step-based training); an integer stops after that
    many epochs of every worker. `shuffle=False` reads shards and samples in file order
    (no shard permutation, no sample buffer). Within an epoch the last window/batch of each
    worker may be padded/short unless the source drops it (`drop_last`).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        source: BatchSource,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        num_epochs: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.urls = expand_urls(urls)
        if len(self.urls) < dp_size:
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split over dp_size={dp_size} data-parallel "
                f"ranks: write at least {dp_size} shards (ideally many per rank and worker)"
            )
        per_rank = len(self.urls) // dp_size
        if num_workers > per_rank:
            log.warning("dp_rank %d: %d shard(s) for %d workers; some workers stay idle",
                        dp_rank, per_rank, num_workers)
        self.source = source
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.num_epochs = num_epochs
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.num_logical = max(1, num_workers)
        self.positions = [WorkerPosition() for _ in range(self.num_logical)]
        self.cursor = 0
        self.stats = DataStats()

    # -- worker side ---------------------------------------------------------------------

    def _worker_stream(self, logical: int, start: WorkerPosition) -> Iterator[dict[str, Any]]:
        events: list[BadDataEvent] = []
        epoch, skip = start.epoch, start.index
        while not start.done and (self.num_epochs is None or epoch < self.num_epochs):
            shards = epoch_shards(self.urls, seed=self.seed, epoch=epoch, dp_rank=self.dp_rank,
                                  dp_size=self.dp_size, worker=logical,
                                  num_workers=self.num_logical, shuffle=self.shuffle)
            if not shards:  # the same count every epoch: this worker has nothing to read
                break
            samples = worker_epoch_samples(
                shards, self.source.decode, events, seed=self.seed, epoch=epoch,
                dp_rank=self.dp_rank, worker=logical,
                buffer_size=self.shuffle_buffer if self.shuffle else 0)
            for index, (rows, payload) in enumerate(self.source.batches(samples)):
                if index < skip:  # replaying what was handed out before the restore
                    events.clear()
                    continue
                yield {"worker": logical, "epoch": epoch, "index": index, "rows": rows,
                       "events": list(events), "batch": self.source.build(payload)}
                events.clear()
            epoch, skip = epoch + 1, 0
        yield {"worker": logical, "end": True, "events": list(events)}

    # -- main side -----------------------------------------------------------------------

    def _items(self) -> Iterator[dict[str, Any]]:
        positions = [WorkerPosition(**asdict(p)) for p in self.positions]
        streams = _WorkerStreams(self, positions, self.cursor)
        if self.num_workers == 0:
            return iter(streams)
        return iter(DataLoader(streams, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                               persistent_workers=False))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        try:
            yield from self._in_order(items)
        finally:
            # stop the worker processes now (also after a worker error or an early break),
            # not whenever the garbage collector gets to the DataLoader iterator
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _in_order(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: list[deque[dict[str, Any]]] = [deque() for _ in range(self.num_logical)]
        while not all(p.done for p in self.positions):
            w = self.cursor
            while self.positions[w].done:
                w = (w + 1) % self.num_logical
            while not pending[w]:
                try:
                    item = next(items)
                except StopIteration:  # only if a worker died without its end marker
                    raise RuntimeError(f"data worker {w} stopped without finishing") from None
                pending[item["worker"]].append(item)
            item = pending[w].popleft()
            self.stats.add_events(item["events"])
            self.cursor = (w + 1) % self.num_logical
            pos = self.positions[w]
            if item.get("end"):
                pos.done = True
                continue
            if item["epoch"] != pos.epoch:
                pos.prev_rows, pos.rows, pos.epoch = pos.rows, 0, item["epoch"]
            pos.index, pos.rows = item["index"] + 1, pos.rows + item["rows"]
            self.stats.batches += 1
            self.stats.rows += item["rows"]
            yield item["batch"]

    def rewind(self) -> None:
        """Back to the first batch, as if new (an evaluation that scores the same batches
        every time); the bad-data counters keep counting."""
        self.positions = [WorkerPosition() for _ in range(self.num_logical)]
        self.cursor = 0

    @property
    def epoch(self) -> int:
        """The earliest epoch a worker of this rank is still in."""
        return min(p.epoch for p in self.positions)

    # -- checkpointing -------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        return {"dp_size": self.dp_size, "num_workers": self.num_workers, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "num_shards": len(self.urls), **self.source.layout()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "layout": self.layout(),
                "positions": [asdict(p) for p in self.positions], "cursor": self.cursor,
                "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        self.stats.load_state_dict(state["stats"])
        old = state["layout"]
        if old == self.layout():
            if state["dp_rank"] != self.dp_rank:
                raise ValueError(f"data state of dp_rank {state['dp_rank']} loaded on "
                                 f"dp_rank {self.dp_rank}: load each rank's own state")
            self.positions = [WorkerPosition(**p) for p in state["positions"]]
            self.cursor = int(state["cursor"])
            return
        self._continue_from_global_count(old, [WorkerPosition(**p) for p in state["positions"]])

    def _continue_from_global_count(self, old: dict[str, Any], olds: list[WorkerPosition]) -> None:
        live = [p for p in olds if not p.done] or olds
        epoch = min(p.epoch for p in live)
        rows = sum(p.rows if p.epoch == epoch else p.prev_rows for p in live)
        global_rows = rows * int(old["dp_size"])
        per_worker = global_rows // (self.dp_size * self.num_logical)
        skip = per_worker // self.source.batch_size
        changed = {k: (old.get(k), v) for k, v in self.layout().items() if old.get(k) != v}
        log.warning(
            "data layout changed %s: continuing epoch %d from the global sample count "
            "(%d rows consumed of it; each of the %d workers of this rank skips %d batches); "
            "this epoch's sample coverage is approximate", changed, epoch, global_rows,
            self.num_logical, skip)
        rows_skipped = skip * self.source.batch_size
        self.positions = [WorkerPosition(epoch=epoch, index=skip, rows=rows_skipped)
                          for _ in range(self.num_logical)]
        self.cursor = 0


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move the tensors of a batch to `device` (non-blocking when pinned)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
