"""Writing shards with webdataset's `ShardWriter`: token documents and video clips.

Shards are named `<prefix>-000000.tar, ...` and are reproducible byte for byte (fixed
mtime). Next to them `<prefix>.json` records what each shard holds, and the brace pattern
a loader takes (`"<dir>/<prefix>-{000000..000041}.tar"`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)


@dataclass
class ShardSummary:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    pattern: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "samples": self.samples, "tokens": self.tokens,
                "shards": self.per_shard}


class ShardSink:
    """A `ShardWriter` that counts samples (and tokens) per shard and writes an index."""

    def __init__(self, output_dir: str | Path, prefix: str = "shard", maxcount: int = 1000,
                 maxsize: float = 256e6, meta: dict[str, Any] | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.meta = prefix, dict(meta or {})
        self.summary = ShardSummary()
        self._current = {"samples": 0, "tokens": 0}
        self._writer = wds.ShardWriter(str(self.dir / f"{prefix}-%06d.tar"), maxcount=maxcount,
                                       maxsize=maxsize, verbose=0, post=self._closed, mtime=0.0)

    def _closed(self, fname: str) -> None:
        self.summary.shards.append(fname)
        self.summary.per_shard.append({"name": Path(fname).name, **self._current})
        self._current = {"samples": 0, "tokens": 0}

    def write(self, sample: dict[str, Any], tokens: int = 0) -> None:
        self._writer.write(sample)
        self._current["samples"] += 1
        self._current["tokens"] += tokens
        self.summary.samples += 1
        self.summary.tokens += tokens

    def close(self) -> ShardSummary:
        self._writer.close()
        s = self.summary
        if s.per_shard and s.per_shard[-1]["samples"] == 0:  # ShardWriter opens eagerly
            Path(s.shards.pop()).unlink()
            s.per_shard.pop()
        if s.shards:
            s.pattern = str(self.dir / f"{self.prefix}-{{000000..{len(s.shards) - 1:06d}}}.tar")
        (self.dir / f"{self.prefix}.json").write_text(
            json.dumps({**self.meta, **s.to_json()}, indent=1) + "\n")
        log.info("wrote %d samples in %d shards to %s", s.samples, len(s.shards), self.dir)
        return s

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not hasattr(self._writer, "shard"):  # already closed
            return
        self.close()


def token_sample(index: int, tokens: np.ndarray, doc_id: int, **meta: Any) -> dict[str, Any]:
    """One document in the LM shard format (`samples.py`)."""
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"token arrays are stored as uint16 or uint32, got {tokens.dtype}")
    return {"__key__": f"doc{index:09d}", "tokens.npy": tokens,
            "json": json.dumps({"doc_id": int(doc_id), **meta})}


def clip_sample(index: int, clip: np.ndarray, label: int | None = None,
                caption: np.ndarray | None = None, **meta: Any) -> dict[str, Any]:
    """One clip in the video shard format (`samples.py`)."""
    sample: dict[str, Any] = {"__key__": f"clip{index:09d}", "clip.npy": clip}
    if label is not None:
        sample["cls"] = int(label)
    if caption is not None:
        sample["emb.npy"] = np.asarray(caption, dtype=np.float32)
    if meta:
        sample["json"] = json.dumps(meta)
    return sample
