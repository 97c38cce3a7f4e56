"""Video batches: clips stacked as stored, with labels and/or caption embeddings.

A batch is `{"clip": [B, F, ...] (uint8 or float, as stored), "label": int64 [B],
"caption": float32 [B, ...], "keys": list[str]}` (`label` / `caption` only when asked
for). Clips are not token sequences yet: a DiT patchifies them and orders the tokens
block-major, and context parallelism slices those tokens in the model (DESIGN §2).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mhla_dist.data.loader import StreamingLoader
from mhla_dist.data.samples import Clip, decode_clip
from mhla_dist.data.shards import RawSample


class ClipBatches:
    """A `BatchSource` of video clips; a clip of another shape than `clip_shape` is a bad
    sample (skipped and counted), since a batch needs one shape."""

    def __init__(
        self,
        batch_size: int,
        *,
        clip_shape: Sequence[int] | None = None,
        with_label: bool = True,
        with_caption: bool = False,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.clip_shape = tuple(clip_shape) if clip_shape is not None else None
        self.with_label, self.with_caption, self.drop_last = with_label, with_caption, drop_last

    def decode(self, shard: str, key: str, files: RawSample) -> Clip:
        return decode_clip(key, files, self.clip_shape, self.with_label, self.with_caption)

    def batches(self, samples: Iterator[Clip]) -> Iterator[tuple[int, list[Clip]]]:
        rows: list[Clip] = []
        for clip in samples:
            if self.clip_shape is None and rows and clip.clip.shape != rows[0].clip.shape:
                raise ValueError(f"clip {clip.key} has shape {clip.clip.shape}, the batch "
                                 f"{rows[0].clip.shape}: set clip_shape to skip odd clips")
            rows.append(clip)
            if len(rows) == self.batch_size:
                yield len(rows), rows
                rows = []
        if rows and not self.drop_last:
            yield len(rows), rows

    def build(self, payload: list[Clip]) -> dict[str, Any]:
        batch: dict[str, Any] = {"clip": torch.from_numpy(np.stack([c.clip for c in payload])),
                                 "keys": [c.key for c in payload]}
        if self.with_label:
            batch["label"] = torch.tensor([c.label for c in payload], dtype=torch.int64)
        if self.with_caption:
            batch["caption"] = torch.from_numpy(np.stack([c.caption for c in payload]))
        return batch

    def layout(self) -> dict[str, Any]:
        return {"kind": "video", "batch_size": self.batch_size,
                "clip_shape": list(self.clip_shape) if self.clip_shape else None,
                "drop_last": self.drop_last}


def video_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    clip_shape: Sequence[int] | None = None,
    with_label: bool = True,
    with_caption: bool = False,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 64,
    num_epochs: int | None = None,
    drop_last: bool = False,
) -> StreamingLoader:
    """A loader of clip batches for one DP rank (see `StreamingLoader`, `ClipBatches`)."""
    source = ClipBatches(batch_size, clip_shape=clip_shape, with_label=with_label,
                         with_caption=with_caption, drop_last=drop_last)
    return StreamingLoader(urls, source, dp_rank=dp_rank, dp_size=dp_size,
                           num_workers=num_workers, seed=seed, shuffle=shuffle,
                           shuffle_buffer=shuffle_buffer, num_epochs=num_epochs)
