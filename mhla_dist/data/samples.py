"""Sample formats on disk, and decoders that turn a raw tar sample into arrays.

LM token shards, one document per sample:
    `<key>.tokens.npy`  1-D uint16 (vocab <= 65536) or uint32 token ids
    `<key>.json`        `{"doc_id": int, ...}` (optional; otherwise a stable hash of the
                        shard and key)
Video clip shards, one clip per sample:
    `<key>.clip.npy`    `[F, H, W, C]` frames (uint8) or `[C, F, H, W]` float latents (any
                        4-D array of one shape for the whole dataset)
    `<key>.cls`         ASCII integer class label (optional)
    `<key>.emb.npy`     caption embedding, float `[D]` or `[L, D]` (optional)
    `<key>.json`        free metadata (optional)
A plain `<key>.npy` is accepted in place of `tokens.npy` / `clip.npy`, so shards written
by other webdataset tools read too. Every decoder raises `ValueError` on a malformed
sample; the caller skips and counts it.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass

import numpy as np

from mhla_dist.data.shards import RawSample

TOKEN_DTYPES = (np.uint16, np.uint32)


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{what} is not a readable .npy array ({exc})") from exc


def _first(files: RawSample, names: tuple[str, ...], what: str) -> bytes:
    for name in names:
        if name in files:
            return files[name]
    raise ValueError(f"no {what} (expected one of {', '.join(names)}; found {sorted(files)})")


@dataclass
class Document:
    tokens: np.ndarray  # [n] int64
    doc_id: int


def decode_document(shard: str, key: str, files: RawSample, vocab_size: int | None) -> Document:
    """A token document; `ValueError` if it is malformed or holds out-of-vocab ids."""
    tokens = load_npy(_first(files, ("tokens.npy", "npy"), "token array"), "tokens")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    tokens = tokens.astype(np.int64)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size={vocab_size}")
    doc_id = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"bad json metadata ({exc})") from exc
        if isinstance(meta, dict) and "doc_id" in meta:
            doc_id = int(meta["doc_id"])
    if doc_id is None:
        doc_id = zlib.crc32(f"{shard}/{key}".encode()) & 0x7FFFFFFF
    return Document(tokens, doc_id)


@dataclass
class Clip:
    clip: np.ndarray  # 4-D
    label: int | None
    caption: np.ndarray | None
    key: str


def decode_clip(
    key: str,
    files: RawSample,
    clip_shape: tuple[int, ...] | None,
    need_label: bool,
    need_caption: bool,
) -> Clip:
    """A video clip; `ValueError` if malformed, of another shape, or missing a needed field."""
    clip = load_npy(_first(files, ("clip.npy", "npy"), "clip array"), "clip")
    if clip.ndim != 4:
        raise ValueError("clip must be 4-D ([F, H, W, C] frames or [C, F, H, W] latents), "
                         f"got {clip.shape}")
    if clip.dtype != np.uint8 and not np.issubdtype(clip.dtype, np.floating):
        raise ValueError(f"clip must be uint8 or float, got {clip.dtype}")
    if clip_shape is not None and tuple(clip.shape) != tuple(clip_shape):
        raise ValueError(f"clip shape {tuple(clip.shape)} != expected {tuple(clip_shape)}")
    if np.issubdtype(clip.dtype, np.floating) and not np.isfinite(clip).all():
        raise ValueError("clip holds NaN or inf")
    label = None
    if "cls" in files:
        try:
            label = int(files["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"bad class label {files['cls'][:20]!r}") from exc
    elif need_label:
        raise ValueError("no class label (.cls)")
    caption = None
    if "emb.npy" in files:
        caption = load_npy(files["emb.npy"], "caption embedding").astype(np.float32)
    elif need_caption:
        raise ValueError("no caption embedding (.emb.npy)")
    return Clip(clip, label, caption, key)
