"""Multi-query associative recall (MQAR), as Zoology generates it (Arora et al. 2023).

A sequence of `seq_len + 1` tokens: first `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`
(keys from the first half of the vocabulary, values from the second, both distinct), then
every key once more, in random order, at power-law spaced even offsets of the rest (slot
`j` drawn with weight `(j + 1) ** (power_a - 1)`, Zoology's `power_a = 0.01` favours short
gaps); every other position is token 0 (Zoology's `random_non_queries=False`). The model
reads `tokens[:-1]` and is scored only at the query keys, on the value each was paired
with: `labels` are `ignore_index` everywhere else. Token 0 is never a key or a value.

The answers never appear after the pairs, as in Zoology. (An earlier version wrote each
value after its query key: a model could then answer with the paired values not yet
given, without any recall, which scores (1/K + 1/(K-1) + ... + 1) / K, 0.52 at K = 4, and
every trained variant stopped there.)

`MQARLoader` makes such batches on the fly: batch `i` of DP rank `r` comes from a
generator seeded by `(seed, split, r, i)`, so the stream is the same after a resume
(`state_dict` is the batch index) and `rewind()` starts it over (the fixed eval set).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mhla_dist.data.lm import IGNORE_INDEX

SPLITS = {"train": 0, "eval": 1}


def check_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int) -> list[str]:
    """The problems with an MQAR shape (empty when it can be generated)."""
    out = []
    if num_kv_pairs < 1:
        out.append(f"data.num_kv_pairs={num_kv_pairs} must be >= 1")
    elif 4 * num_kv_pairs > seq_len + 1:
        out.append(f"data.num_kv_pairs={num_kv_pairs} needs seq_len + 1 >= 4 x pairs (the "
                   f"pairs, then a two-token slot per query); seq_len is {seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        out.append(f"model.vocab_size={vocab_size} has {max(vocab_size // 2 - 1, 0)} keys "
                   f"(ids 1..V/2-1) for data.num_kv_pairs={num_kv_pairs} distinct ones; "
                   "the values (V/2..V-1) are never fewer")
    return out


def mqar_example(rng: np.random.Generator, seq_len: int, num_kv_pairs: int,
                 vocab_size: int, power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens [seq_len + 1], targets [seq_len])`: targets hold the value to recall at
    each query key's position, `IGNORE_INDEX` elsewhere."""
    d, half = num_kv_pairs, vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=d, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=d, replace=False)
    tokens = np.zeros(seq_len + 1, dtype=np.int64)
    tokens[0:2 * d:2], tokens[1:2 * d:2] = keys, values
    slots = (seq_len + 1 - 2 * d) // 2  # query slots of two tokens after the pairs
    weights = (np.arange(slots) + 1.0) ** (power_a - 1)
    chosen = rng.choice(slots, size=d, replace=False, p=weights / weights.sum())
    order = rng.permutation(d)
    at = 2 * d + 2 * chosen
    tokens[at] = keys[order]
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    targets[at] = values[order]  # the input at a query key predicts its value
    return tokens, targets


class MQARLoader:
    """Endless seeded MQAR batches `{"input_ids", "labels"}` `[B, seq_len]` for one DP rank
    (the trainer's loader interface: iteration, `rewind`, `state_dict`)."""

    def __init__(self, *, seq_len: int, batch_size: int, num_kv_pairs: int, vocab_size: int,
                 seed: int = 0, split: str = "train", dp_rank: int = 0,
                 power_a: float = 0.01) -> None:
        problems = check_mqar(seq_len, num_kv_pairs, vocab_size)
        if problems:
            raise ValueError("; ".join(problems))
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
        self.seq_len, self.batch_size, self.num_kv_pairs = seq_len, batch_size, num_kv_pairs
        self.vocab_size, self.seed, self.split = vocab_size, seed, split
        self.dp_rank, self.power_a, self.index = dp_rank, power_a, 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], self.dp_rank, index])
        rows = [mqar_example(rng, self.seq_len, self.num_kv_pairs, self.vocab_size,
                             self.power_a) for _ in range(self.batch_size)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            out = self.batch(self.index)
            self.index += 1
            yield out

    def rewind(self) -> None:
        self.index = 0

    def layout(self) -> dict[str, Any]:
        return {"kind": "mqar", "seq_len": self.seq_len, "batch_size": self.batch_size,
                "num_kv_pairs": self.num_kv_pairs, "vocab_size": self.vocab_size,
                "seed": self.seed, "power_a": self.power_a}

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout(), "dp_rank": self.dp_rank, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout") != self.layout():
            raise ValueError(f"MQAR data state of another stream: {state.get('layout')} vs "
                             f"{self.layout()}")
        if state["dp_rank"] != self.dp_rank:
            raise ValueError(f"data state of dp_rank {state['dp_rank']} loaded on dp_rank "
                             f"{self.dp_rank}")
        self.index = int(state["index"])
