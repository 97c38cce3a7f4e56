"""Small synthetic shards for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhla_dist.data import ShardSink, clip_sample, token_sample

CLIP_SHAPE = (2, 4, 4, 3)


def documents(num_docs: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 250, int(rng.integers(1, 40))).astype(np.uint16)
            for _ in range(num_docs)]


def write_docs(folder: Path, docs: list[np.ndarray], per_shard: int) -> str:
    with ShardSink(folder, "tok", maxcount=per_shard) as sink:
        for i, d in enumerate(docs):
            sink.write(token_sample(i, d, doc_id=i), tokens=len(d))
    return sink.summary.pattern


def write_clips(folder: Path, num_clips: int, per_shard: int) -> str:
    with ShardSink(folder, "clips", maxcount=per_shard) as sink:
        for i in range(num_clips):
            clip = np.full(CLIP_SHAPE, i % 256, dtype=np.uint8)
            sink.write(clip_sample(i, clip, label=i % 7))
    return sink.summary.pattern


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
