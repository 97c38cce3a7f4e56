"""Language-model batches: documents packed into `seq_len + 1` token windows.

Packing: the documents of a worker's epoch (in shuffled order) are concatenated, each
followed by `eos_id` (unless None), and cut into windows of `seq_len + 1` tokens with a
stride of `seq_len`: consecutive windows share one token, so every token is a target
exactly once (`inputs = window[:-1]`, `targets = window[1:]`). The end of an epoch pads
the last window with `pad_id` and doc id -1 (nothing is dropped; `shift_tokens` turns
padded targets into `ignore_index`). Windows never cross epochs.

A batch is `{"tokens": int64 [B, seq_len + 1], "doc_ids": int64 [B, seq_len + 1]}`: the
document id of every token (the EOS belongs to the document it ends), so a model can mask
attention across documents. The last batch of an epoch may hold fewer rows.

Document masking (DESIGN §1 "Packed documents"): `shift_tokens` derives from the doc ids
the `cu_seqlens` of the inputs, flash-linear-attention's offsets over the `B * seq_len`
flattened tokens (a document starts at every row start and wherever the doc id changes;
the padding run is one more document), and ignores the target that crosses a document
boundary. Deriving them from `doc_ids`, not emitting them from the packer, makes any batch
with doc ids work (a restored loader, a test's hand-made batch). A document boundary is
a change of id: two neighbouring documents with one id (a shard set that repeats
`doc_id`) read as one document.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mhla_dist.data.loader import StreamingLoader
from mhla_dist.data.samples import Document, decode_document
from mhla_dist.data.shards import RawSample
from mhla_dist.data.tokenizer import EOS_ID

IGNORE_INDEX = -100


class TokenWindows:
    """A `BatchSource` packing token documents into windows."""

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        *,
        eos_id: int | None = EOS_ID,
        pad_id: int = 0,
        vocab_size: int | None = None,
        drop_last: bool = False,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_size, self.drop_last = vocab_size, drop_last

    def decode(self, shard: str, key: str, files: RawSample) -> Document:
        return decode_document(shard, key, files, self.vocab_size)

    def windows(self, docs: Iterator[Document]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(tokens, doc_ids)` windows of `seq_len + 1`, the last one padded."""
        L = self.seq_len
        toks: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        n = 0
        emitted = False
        for doc in docs:
            t = doc.tokens
            if self.eos_id is not None:
                t = np.concatenate([t, np.array([self.eos_id], dtype=np.int64)])
            toks.append(t)
            ids.append(np.full(len(t), doc.doc_id, dtype=np.int64))
            n += len(t)
            if n < L + 1:
                continue
            tok, idx = np.concatenate(toks), np.concatenate(ids)
            count = (n - 1) // L
            for i in range(count):
                yield tok[i * L: i * L + L + 1], idx[i * L: i * L + L + 1]
            emitted = True
            toks, ids = [tok[count * L:]], [idx[count * L:]]
            n = len(toks[0])
        if n >= 2 or (n == 1 and not emitted):  # n == 1: that token was already a target
            tok, idx = np.concatenate(toks), np.concatenate(ids)
            pad = L + 1 - n
            yield (np.concatenate([tok, np.full(pad, self.pad_id, dtype=np.int64)]),
                   np.concatenate([idx, np.full(pad, -1, dtype=np.int64)]))

    def batches(self, samples: Iterator[Document]) -> Iterator[tuple[int, list]]:
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        for window in self.windows(samples):
            rows.append(window)
            if len(rows) == self.batch_size:
                yield len(rows), rows
                rows = []
        if rows and not self.drop_last:
            yield len(rows), rows

    def build(self, payload: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(np.stack([t for t, _ in payload])),
                "doc_ids": torch.from_numpy(np.stack([d for _, d in payload]))}

    def layout(self) -> dict[str, Any]:
        return {"kind": "lm", "seq_len": self.seq_len, "batch_size": self.batch_size,
                "eos_id": self.eos_id, "drop_last": self.drop_last}


def lm_loader(
    urls: str | Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 256,
    num_epochs: int | None = None,
    eos_id: int | None = EOS_ID,
    pad_id: int = 0,
    vocab_size: int | None = None,
    drop_last: bool = False,
) -> StreamingLoader:
    """A loader of packed LM batches for one DP rank (see `StreamingLoader`, `TokenWindows`).

    Every TP and CP rank of a DP replica calls this with the same `dp_rank`."""
    source = TokenWindows(seq_len, batch_size, eos_id=eos_id, pad_id=pad_id,
                          vocab_size=vocab_size, drop_last=drop_last)
    return StreamingLoader(urls, source, dp_rank=dp_rank, dp_size=dp_size,
                           num_workers=num_workers, seed=seed, shuffle=shuffle,
                           shuffle_buffer=shuffle_buffer, num_epochs=num_epochs)


def document_offsets(doc_ids: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens [num_docs + 1]` (host int64) of `doc_ids [B, L]` flattened to `B * L`
    tokens: 0, every row start `b * L`, every position where the id changes within a row,
    and `B * L`."""
    ids = doc_ids.detach().cpu()
    B, L = ids.shape
    starts = torch.ones(B, L, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    bos = torch.nonzero(starts.reshape(-1)).reshape(-1)
    return torch.cat([bos, torch.tensor([B * L])]).to(torch.int64)


def shift_tokens(batch: dict[str, torch.Tensor], ignore_index: int = IGNORE_INDEX,
                 document_masking: bool = True) -> dict[str, torch.Tensor]:
    """`tokens [B, L+1]` -> `input_ids [B, L]`, `labels [B, L]` (padded targets set to
    `ignore_index`) and the `doc_ids [B, L]` of the inputs.

    `document_masking`: also ignore every target whose doc id differs from its input's (a
    document's last token predicting the next one's first, at the window end too), and
    add `cu_seqlens` (`document_offsets` of the input doc ids, on the host even when
    `doc_ids` is not). False: neither, as before document masking."""
    tokens, doc_ids = batch["tokens"], batch["doc_ids"]
    labels = tokens[:, 1:].clone()
    labels[doc_ids[:, 1:] < 0] = ignore_index
    out = {"input_ids": tokens[:, :-1], "labels": labels, "doc_ids": doc_ids[:, :-1]}
    if document_masking:
        labels[doc_ids[:, 1:] != doc_ids[:, :-1]] = ignore_index
        out["cu_seqlens"] = document_offsets(out["doc_ids"])
    return out


def cp_slice(batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int,
             dim: int = 1, document_masking: bool = True) -> dict[str, torch.Tensor]:
    """The contiguous sequence slice context-parallel rank `cp_rank` keeps (DESIGN §2:
    rank r holds tokens [r N/P, (r+1) N/P)).

    An unshifted LM batch (`tokens`, `seq_len + 1` long) is shifted first (with
    `document_masking`, see `shift_tokens`), so inputs and targets are sliced together.
    Every tensor whose `dim` has the sequence length is sliced; other values pass through,
    `cu_seqlens` always: its offsets are global (DESIGN §1), the same on every CP rank.
    Video clips are sliced by the model after patchifying.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is not in [0, cp_size={cp_size})")
    if "tokens" in batch and "input_ids" not in batch:
        batch = shift_tokens(batch, document_masking=document_masking)
    seq = batch["input_ids"].shape[dim] if "input_ids" in batch else None
    if seq is None:
        raise ValueError(f"cp_slice needs an LM batch (tokens or input_ids), got {sorted(batch)}")
    if seq % cp_size:
        raise ValueError(f"sequence length {seq} does not split over cp_size={cp_size} "
                         f"context-parallel ranks: make seq_len a multiple of {cp_size}")
    n = seq // cp_size
    return {k: v.narrow(dim, cp_rank * n, n)
            if k != "cu_seqlens" and isinstance(v, torch.Tensor) and v.dim() > dim
            and v.shape[dim] == seq else v
            for k, v in batch.items()}
