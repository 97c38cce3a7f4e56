"""Vocab-parallel embedding and LM head: each TP rank holds `1/TP` of the vocabulary rows,
as Megatron-LM's `VocabParallelEmbedding` and its parallel output layer.

The vocabulary `V` is padded to `TP * ceil(V / TP)` rows (Megatron pads the same way, to
a multiple of TP times `make_vocab_size_divisible_by`); TP rank `r` holds rows
`[r V_l, (r+1) V_l)`. Padding rows are zero at initialisation, get no gradient (the
embedding never looks them up; the loss masks them out of its logsumexp,
`model/linear_cross_entropy.py`), and never leave the model: the full state of a padded
parameter is its first `V` rows (`tp_state`), what consolidation, conversion and universal
checkpoints see, whatever the TP degree. The parameters carry megatron-core's split
attributes (dim 0) and `padded_rows_of = V`.

Initialisation draws the full `[V, hidden]` matrix the way `nn.Embedding` / `nn.Linear`
with a normal re-initialisation do, then splits it: the same weights at every TP degree
for the same seed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .collectives import gather_for_replicated, reduce_scatter_to_group
from .tp_layers import resolve_tp_group
from .tp_state import pad_rows, padded_vocab


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: the partial embeddings of the TP ranks
    summed into the replicated hidden states."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _VocabShard(nn.Module):
    """The rows `[start, start + rows)` of a `[vocab_size, hidden]` matrix over TP."""

    def __init__(self, vocab_size: int, full: torch.Tensor, tp_group) -> None:
        super().__init__()
        self.tp_group, self.tp = resolve_tp_group(tp_group)
        rank = dist.get_rank(self.tp_group)
        self.vocab_size, self.rows = vocab_size, padded_vocab(vocab_size, self.tp) // self.tp
        self.start = rank * self.rows
        full = pad_rows(full, self.tp)
        self.weight = w = nn.Parameter(full[self.start:self.start + self.rows].clone())
        # Marked at every TP degree, as megatron-core marks its parallel linears.
        w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, 0, 1
        w.padded_rows_of = vocab_size

    def full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """`[..., V]` logits from this rank's `[..., V_l]` (gathered, padding dropped)."""
        if self.tp == 1:
            return local
        return gather_for_replicated(local, -1, self.tp_group)[..., :self.vocab_size]


class VocabParallelEmbedding(_VocabShard):
    """`nn.Embedding(vocab_size, hidden_size)` with its rows split over `tp_group`; the
    output (the full embedding, replicated over TP) is the sum of the ranks' lookups."""

    def __init__(self, vocab_size: int, hidden_size: int, *, init_std: float,
                 tp_group=None) -> None:
        full = torch.empty(vocab_size, hidden_size)
        nn.init.normal_(full)  # nn.Embedding's own draw, then the model's
        nn.init.normal_(full, std=init_std)
        super().__init__(vocab_size, full, tp_group)

    def forward(self, tokens: torch.Tensor, scatter: bool = False) -> torch.Tensor:
        """`[B, N]` ids -> `[B, N, hidden]`; with `scatter` (sequence parallelism) the
        ranks' partial lookups are reduce-scattered over the sequence instead of summed:
        this TP rank's `[B, N / TP, hidden]` shard."""
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        if scatter:
            return reduce_scatter_to_group(out, 1, self.tp_group)
        return _ReduceFromGroup.apply(out, self.tp_group)


class VocabParallelHead(_VocabShard):
    """The untied LM head `nn.Linear(hidden_size, vocab_size, bias=False)`, rows split over
    `tp_group`. `forward` gives this rank's `[..., V_l]` logits; `full_logits` gathers."""

    def __init__(self, vocab_size: int, hidden_size: int, *, init_std: float,
                 tp_group=None) -> None:
        full = torch.empty(vocab_size, hidden_size)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))  # nn.Linear's own draw, then ours
        nn.init.normal_(full, std=init_std)
        super().__init__(vocab_size, full, tp_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)
