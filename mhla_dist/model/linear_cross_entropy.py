"""The LM head and its cross-entropy fused over chunks of tokens: the `[tokens, vocab]`
logits are never held whole, in the forward or the backward.

    sum over targeted tokens t of  logsumexp_v(h_t . W_v) - h_t . W_{target_t}

The forward keeps only the per-token logsumexp (fp32, `[tokens]`); the backward recomputes
each chunk's logits and turns them into `softmax - onehot` in place, so the peak is one
chunk of fp32 logits, whatever the sequence length. Logits and logsumexp are fp32 (at least) however
the hidden states and head are stored (bf16 is safe); the head's gradient is accumulated
in fp32 over the chunks. `ignore_index` targets add nothing, to the sum, the count or any
gradient: the same `(sum, count)` contract as `token_loss`.

Vocab-parallel (`tp_group` of TP > 1 ranks, as Megatron-LM's `vocab_parallel_cross_entropy`):
each rank holds the rows `[r V_l, (r+1) V_l)` of a vocabulary padded to `TP * V_l`. The
ranks combine their logsumexps and the target logit (two collectives of `[tokens]` fp32);
in the backward each rank's partial gradient of the (replicated) hidden states is summed
over TP. Padding rows (ids >= `vocab_size`) are masked out of the logsumexp, so they never
get a gradient and no probability.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mhla_dist.parallel.collectives import all_gather_dim0

# fp32 logits per chunk: 2**23 elements is 32 MiB (256 tokens at a 32K vocabulary).
DEFAULT_LOGIT_BUDGET = 2**23


def default_chunk_tokens(vocab_local: int, budget: int = DEFAULT_LOGIT_BUDGET) -> int:
    return max(1, budget // max(vocab_local, 1))


class _Shard:
    """Which global vocabulary ids this rank's `rows` head rows hold."""

    def __init__(self, rows: int, vocab_size: int | None, tp_group,
                 reduce_hidden_grad: bool = True) -> None:
        self.group, self.reduce_hidden_grad = tp_group, reduce_hidden_grad
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        self.rows, self.start = rows, rank * rows
        vocab = rows * self.tp if vocab_size is None else vocab_size
        if not 0 < vocab <= rows * self.tp:
            raise ValueError(f"vocab_size={vocab_size} does not fit {self.tp} shards of "
                             f"{rows} rows (padded to {rows * self.tp})")
        self.valid = max(0, min(rows, vocab - self.start))  # real (not padding) rows here

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, weight).to(torch.promote_types(h.dtype, torch.float32))
        if self.valid < self.rows:
            out[:, self.valid:] = float("-inf")
        return out

    def local_targets(self, targets: torch.Tensor):
        """`(index into this shard, whether the target is in it)`."""
        local = targets - self.start
        mine = (local >= 0) & (local < self.valid)
        return local.clamp(0, max(self.rows - 1, 0)), mine


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, shard):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target_logit = torch.zeros(n, dtype=acc, device=hidden.device)
        local, mine = shard.local_targets(targets)
        for a, b in _chunks(n, chunk):
            logits = shard.logits(hidden[a:b], weight)
            lse[a:b] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, local[a:b, None])[:, 0]
            target_logit[a:b] = torch.where(mine[a:b], picked, 0.0)
            del logits
        if shard.tp > 1:
            every, _ = all_gather_dim0(lse[None], shard.group)  # [TP, n]
            lse = torch.logsumexp(every, dim=0)
            dist.all_reduce(target_logit, group=shard.group)
        valid = targets != ignore_index
        total = torch.where(valid, lse - target_logit, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.chunk, ctx.shard = ignore_index, chunk, shard
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        shard, n = ctx.shard, hidden.shape[0]
        local, mine = shard.local_targets(targets)
        acc = lse.dtype
        scale = torch.where(targets != ctx.ignore_index, grad_total.to(acc), 0.0)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=acc, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for a, b in _chunks(n, ctx.chunk):
            g = shard.logits(hidden[a:b], weight)
            g.sub_(lse[a:b, None]).exp_()  # softmax (padding columns: exp(-inf) = 0)
            rows = torch.nonzero(mine[a:b])[:, 0]
            g[rows, local[a:b][rows]] -= 1.0
            g.mul_(scale[a:b, None])
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[a:b] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ hidden[a:b]).to(acc)
            del g
        if grad_hidden is not None and shard.tp > 1 and shard.reduce_hidden_grad:
            dist.all_reduce(grad_hidden, group=shard.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_tokens: int | None = None,
                         tp_group=None, vocab_size: int | None = None,
                         reduce_hidden_grad: bool = True):
    """`(sum of the token cross-entropies of F.linear(hidden, weight), number of targets)`.

    hidden: `[..., D]`; weight: `[V_local, D]` (this TP rank's rows; all of them without
    TP); targets: `[...]` global ids or `ignore_index`. `chunk_tokens`: tokens per chunk
    (default: 32 MiB of fp32 logits). `vocab_size`: the real vocabulary when the rows are
    padded (TP * V_local >= vocab_size); default TP * V_local. `reduce_hidden_grad`
    (vocab-parallel): sum the hidden states' partial gradients over TP here; False when
    the caller's region already does (a `copy_to_group` or a sequence-parallel gather).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         "disagree: one target per hidden state")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    shard = _Shard(weight.shape[0], vocab_size, tp_group, reduce_hidden_grad)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk, shard)
    return total, (t != ignore_index).sum()
