"""The deterministic sample stream of one worker in one epoch.

Everything here is a pure function of (seed, epoch, dp_rank, dp_size, worker,
num_workers) and the shard contents: no global RNG, no clock. That is what makes resume
exact: a restored worker regenerates its epoch and drops the batches it already gave.

Split: the epoch's shard order (a permutation seeded by `seed` and `epoch` only) is dealt
to the DP ranks round-robin (`order[dp_rank::dp_size]`), then to the loader workers of that
rank (`[worker::num_workers]`). Every TP and CP rank of a DP replica passes the same
`dp_rank`, so they read the same samples; across DP ranks each shard is read by exactly
one rank per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from mhla_dist.data.shards import RawSample, read_shard
from mhla_dist.data.stats import BadDataEvent, NoValidDataError, report_bad_sample

log = logging.getLogger(__name__)

T = TypeVar("T")


def epoch_shards(
    urls: Sequence[str],
    *,
    seed: int,
    epoch: int,
    dp_rank: int,
    dp_size: int,
    worker: int = 0,
    num_workers: int = 1,
    shuffle: bool = True,
) -> list[str]:
    """The shards one worker of one DP rank reads in `epoch`, in reading order."""
    order = list(urls)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order[dp_rank::dp_size][worker::num_workers]


def shuffle_buffer(items: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """webdataset-style sample shuffle: a buffer of `size`, each new item swaps out a random
    resident; `size <= 1` keeps the order."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    for i in rng.permutation(len(buf)):
        yield buf[int(i)]


def decoded_samples(
    shards: Sequence[str],
    decode: Callable[[str, str, RawSample], Any],
    events: list[BadDataEvent],
    counts: dict[str, int],
) -> Iterator[Any]:
    """Read and decode the shards in order; a sample whose decode raises is skipped and
    reported. `counts["valid"]` counts the samples that decoded."""
    for shard in shards:
        for key, files in read_shard(shard, events):
            try:
                item = decode(shard, key, files)
            except Exception as exc:  # corrupt data raises anything; the sample is skipped
                report_bad_sample(events, shard, key, exc)
                continue
            counts["valid"] += 1
            yield item


def worker_epoch_samples(
    shards: Sequence[str],
    decode: Callable[[str, str, RawSample], Any],
    events: list[BadDataEvent],
    *,
    seed: int,
    epoch: int,
    dp_rank: int,
    worker: int,
    buffer_size: int,
) -> Iterator[Any]:
    """Decoded, buffer-shuffled samples of one worker's share of an epoch.

    Raises `NoValidDataError` when the share held shards but not one valid sample: with a
    few shards per worker that means the data is broken, and training on nothing would
    otherwise spin silently.
    """
    counts = {"valid": 0}
    rng = np.random.default_rng([seed, epoch, dp_rank, worker, 1])
    yield from shuffle_buffer(decoded_samples(shards, decode, events, counts), buffer_size, rng)
    if shards and counts["valid"] == 0:
        recent = "; ".join(e.describe() for e in events[-3:]) or "they hold no samples"
        raise NoValidDataError(
            f"epoch {epoch}, dp_rank {dp_rank}, worker {worker}: no valid sample in "
            f"{len(shards)} shard(s) {list(shards)[:8]}: {recent}"
        )
