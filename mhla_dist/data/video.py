"""Video batches: clips stacked as stored, with labels and/or caption embeddings.

A batch is `{"clip": [B, F, ...] (uint8 or float, as stored), "label": int64 [B],
"caption": float32 [B, ...], "keys": list[str]}` (`label` / `caption` only when asked
for). Caption *tokens* (`text_shape=(text_len, text_dim)`: `emb.npy` is `[L, text_dim]`,
`L <= text_len`) come as `"text"` float32 `[B, L_pad, text_dim]`, zero padded, with
`"text_mask"` bool `[B, L_pad]` (True = a real token) when padding to the batch's longest
caption; `pad_text_to_len=True` pads every caption to `text_len` and gives no mask (every
token attended, as Wan2.1 does). An empty caption (`L = 0`) is the null caption: one zero
token. Clips are not token sequences yet: a DiT patchifies them and orders the tokens
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
        text_shape: tuple[int, int] | None = None,
        pad_text_to_len: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.clip_shape = tuple(clip_shape) if clip_shape is not None else None
        self.with_label, self.drop_last = with_label, drop_last
        self.with_caption = with_caption or text_shape is not None
        self.text_shape = tuple(text_shape) if text_shape is not None else None
        self.pad_text_to_len = pad_text_to_len

    def decode(self, shard: str, key: str, files: RawSample) -> Clip:
        clip = decode_clip(key, files, self.clip_shape, self.with_label, self.with_caption)
        if self.text_shape is not None:
            check_text_tokens(clip.caption, *self.text_shape)
        return clip

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
        if self.text_shape is not None:
            batch.update(pad_text([c.caption for c in payload], self.text_shape,
                                  self.pad_text_to_len))
        elif self.with_caption:
            batch["caption"] = torch.from_numpy(np.stack([c.caption for c in payload]))
        return batch

    def layout(self) -> dict[str, Any]:
        return {"kind": "video", "batch_size": self.batch_size,
                "clip_shape": list(self.clip_shape) if self.clip_shape else None,
                "drop_last": self.drop_last}


def check_text_tokens(tokens: np.ndarray, text_len: int, text_dim: int) -> None:
    """`ValueError` unless `tokens` is a caption `[L, text_dim]` with `L <= text_len`."""
    if tokens.ndim != 2 or tokens.shape[1] != text_dim:
        raise ValueError(f"caption tokens (emb.npy) of shape {tuple(tokens.shape)}; the model "
                         f"takes [L, text_dim] = [L, {text_dim}] (text_dim={text_dim})")
    if tokens.shape[0] > text_len:
        raise ValueError(f"caption of {tokens.shape[0]} tokens; at most text_len={text_len} "
                         "(raise model.text_len, or shorten the caption when encoding it)")
    if not np.isfinite(tokens).all():
        raise ValueError("caption tokens hold NaN or inf")


def pad_text(captions: Sequence[np.ndarray], text_shape: tuple[int, int],
             to_len: bool) -> dict[str, torch.Tensor]:
    """`{"text": [B, L_pad, D]}` zero padded (+ `"text_mask"` `[B, L_pad]` unless `to_len`:
    padded to `text_len` and every token attended). An empty caption is one zero token."""
    text_len, dim = text_shape
    lengths = [len(c) for c in captions]
    width = text_len if to_len else max(max(lengths), 1)
    text = np.zeros((len(captions), width, dim), np.float32)
    for row, c in zip(text, captions, strict=True):
        row[:len(c)] = c
    out = {"text": torch.from_numpy(text)}
    if not to_len:
        out["text_mask"] = torch.arange(width)[None] < torch.tensor(lengths)[:, None].clamp(min=1)
    return out


def video_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    clip_shape: Sequence[int] | None = None,
    with_label: bool = True,
    with_caption: bool = False,
    text_shape: tuple[int, int] | None = None,
    pad_text_to_len: bool = False,
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
                         with_caption=with_caption, drop_last=drop_last,
                         text_shape=text_shape, pad_text_to_len=pad_text_to_len)
    return StreamingLoader(urls, source, dp_rank=dp_rank, dp_size=dp_size,
                           num_workers=num_workers, seed=seed, shuffle=shuffle,
                           shuffle_buffer=shuffle_buffer, num_epochs=num_epochs)
