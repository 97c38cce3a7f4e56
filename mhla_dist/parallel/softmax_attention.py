"""Softmax attention (SDPA) for hybrid models, heads split over TP and tokens over CP.

Under context parallelism K and V are all-gathered over the CP group (DESIGN §2) and
each rank attends its own queries to the keys it needs; the gradient of the gathered K, V
is reduce-scattered back. Its traffic grows with N, unlike MHLA's summaries: keep such
layers few.

Without packed documents no attention mask is ever built. Without CP a causal layer is
SDPA's `is_causal` (its flash kernels). Under CP, rank `r` holds the queries of tokens
`[r n, (r+1) n)`: a causal rank needs only the key chunks `0..r`, the earlier ones unmasked
and its own chunk, a square diagonal block, with `is_causal`. `_PrefixCausalAttention` runs
the two pieces with fused kernels that also return the logsumexp of each query's scores,
merges the outputs by logsumexp (exactly), and back-propagates each piece with the merged
output and logsumexp: the flash backward recomputes the attention weights as
`exp(s - lse)`, so with the global `lse` every piece's dq, dk, dv are exact, and dq is their
sum (as in ring attention). The kernels are aten's own, the ones SDPA dispatches to: on CPU
`_scaled_dot_product_flash_attention_for_cpu` (every float dtype, float64 included), on CUDA
`_scaled_dot_product_efficient_attention` (float16, bfloat16, float32; it pads the
logsumexp to a multiple of 32 queries, which the merge carries along).

Packed documents (`cu_seqlens`, DESIGN §1 "Packed documents") need a mask, and it spans the
smallest key range: `document_attention` slices K, V to the keys this rank's queries can see
(from the first token of the earliest document they belong to, to their last token; non-causal
to the end of the latest one), so a rank whose documents all start locally never reads an
earlier rank's keys, and the keys it does not read get a zero gradient. The boolean mask
`[B, 1, n, K]` (same document, and causal) is built on the device from the offsets, with no
loop over documents. When every row of that range lies inside one document the mask is the
plain causal one and the mask-free kernels above run instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mhla_kernels import check_cu_seqlens

from .collectives import gather_from_group
from .cp_attention import resolve_cp_group
from .tp_layers import AttentionProjections

_aten = torch.ops.aten
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class KVCache:
    k: torch.Tensor  # [B, T, H, d]
    v: torch.Tensor

    @property
    def position(self) -> int:
        return self.k.shape[1]


def _sdpa(q, k, v, *, causal: bool = False):
    """`[B, N, H, d]` in and out; `causal` aligns the query and key sequences at the start."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal)
    return o.transpose(1, 2)


def _attention_fwd(q, k, v, causal: bool):
    """`q` `[B, H, Nq, d]`, `k`, `v` `[B, H, Nk, d]` -> `(o, lse, rng)`: the output, the
    logsumexp of each query's scaled scores `[B, H, >= Nq]` (float32 or wider) and the
    kernel's dropout state that its backward takes."""
    if q.device.type == "cpu":
        o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return o, lse, ()
    if q.device.type == "cuda" and q.dtype in _CUDA_DTYPES:
        o, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal)
        return o, lse, (seed, offset)
    raise ValueError(f"causal softmax attention under context parallelism runs on CPU, or on "
                     f"CUDA in {_CUDA_DTYPES}; got {q.dtype} on {q.device.type}")


def _attention_bwd(do, q, k, v, o, lse, rng, causal: bool):
    """dq, dk, dv of `_attention_fwd`, given the output `o` and logsumexp `lse`."""
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal)
    return _aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, None, o, lse, *rng, 0.0, [True, True, True, False], causal)[:3]


class _PrefixCausalAttention(torch.autograd.Function):
    """Queries `[B, H, n, d]` attending to `past` keys (all visible) and to `diag` keys
    (the queries' own tokens, causal)."""

    @staticmethod
    def forward(ctx, q, k_past, v_past, k_diag, v_diag):
        o_past, lse_past, rng_past = _attention_fwd(q, k_past, v_past, causal=False)
        o_diag, lse_diag, rng_diag = _attention_fwd(q, k_diag, v_diag, causal=True)
        lse = torch.logaddexp(lse_past, lse_diag)
        n = q.shape[2]
        w_past, w_diag = ((part[..., :n] - lse[..., :n]).exp().unsqueeze(-1)
                          for part in (lse_past, lse_diag))
        o = (w_past * o_past + w_diag * o_diag).to(q.dtype)
        ctx.save_for_backward(q, k_past, v_past, k_diag, v_diag, o, lse)
        ctx.rng = rng_past, rng_diag
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_past, v_past, k_diag, v_diag, o, lse = ctx.saved_tensors
        dq_past, dk_past, dv_past = _attention_bwd(do, q, k_past, v_past, o, lse, ctx.rng[0],
                                                   causal=False)
        dq_diag, dk_diag, dv_diag = _attention_bwd(do, q, k_diag, v_diag, o, lse, ctx.rng[1],
                                                   causal=True)
        return dq_past + dq_diag, dk_past, dv_past, dk_diag, dv_diag


def _causal_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`q` `[B, H, n, d]` attending causally to the last `n` keys of `k`, `v` `[B, H, K, d]`
    (the queries' own tokens) and to all `K - n` keys before them."""
    past = k.shape[2] - q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _PrefixCausalAttention.apply(q, k[:, :, :past], v[:, :, :past], k[:, :, past:],
                                        v[:, :, past:])


def cp_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rank: int) -> torch.Tensor:
    """Causal softmax attention of CP rank `rank`'s queries `q` `[B, n, H, d]` (tokens
    `[rank n, (rank+1) n)`) to the gathered `k`, `v` `[B, N, H, d]`; keys after the
    queries' last token are not touched (their gradient is zero)."""
    keys = slice(0, (rank + 1) * q.shape[1])
    q, k, v = (t.transpose(1, 2) for t in (q, k[:, keys], v[:, keys]))
    return _causal_after_prefix(q, k, v).transpose(1, 2)


def _fused_kernels_run(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `_attention_fwd` has a kernel for `q`'s device and dtype (the CPU one needs
    `dv == d`)."""
    if q.shape[-1] != v.shape[-1]:
        return False
    return q.device.type == "cpu" or (q.device.type == "cuda" and q.dtype in _CUDA_DTYPES)


def _document_of(cu: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The document index of each flat token index in `tokens` (any shape)."""
    return torch.searchsorted(cu, tokens, right=True) - 1


def document_key_range(cu: torch.Tensor, batch: int, n: int, rank: int, cp: int, *,
                       causal: bool = True) -> tuple[int, int, bool]:
    """`(lo, hi, one_document)`: the keys `[lo, hi)` of a row (over all `batch` rows) that CP
    rank `rank`'s queries (tokens `[rank n, (rank+1) n)`) can see under the checked host
    offsets `cu`, and whether in every row those keys lie inside one document (then the
    document mask is the plain, mask-free one). Host arithmetic on `batch` tokens only."""
    seq = n * cp
    rows = torch.arange(batch) * seq
    first, last = rows + rank * n, rows + (rank + 1) * n - 1
    lo = int((cu[_document_of(cu, first)] - rows).min())
    hi = (rank + 1) * n if causal else int((cu[_document_of(cu, last) + 1] - rows).max())
    one_document = bool((_document_of(cu, rows + lo) == _document_of(cu, rows + hi - 1)).all())
    return lo, hi, one_document


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned, the copy is truly asynchronous: no host synchronisation per layer.
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def document_mask(cu: torch.Tensor, batch: int, n: int, rank: int, cp: int, lo: int, hi: int,
                  *, causal: bool = True, device=None) -> torch.Tensor:
    """`[B, 1, n, hi - lo]` bool, built on `device`: query `i` of CP rank `rank` (token
    `rank n + i` of its row) sees key `lo + j` iff they are in the same document of the host
    offsets `cu` (and, when `causal`, `lo + j <= rank n + i`)."""
    cu = _to_device(cu, torch.device(device) if device is not None else cu.device)
    rows = torch.arange(batch, device=cu.device)[:, None] * (n * cp)
    q_pos = torch.arange(rank * n, (rank + 1) * n, device=cu.device)
    k_pos = torch.arange(lo, hi, device=cu.device)
    q_doc, k_doc = _document_of(cu, rows + q_pos), _document_of(cu, rows + k_pos)
    mask = q_doc[:, :, None] == k_doc[:, None, :]
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    return mask[:, None]


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, *,
                       rank: int = 0, cp: int = 1, causal: bool = True) -> torch.Tensor:
    """Softmax attention within packed documents: every query attends only to the keys of
    its own document (causally when `causal`), equal to SDPA run on each document alone.

    Args:
        q: `[B, n, H, d]`, CP rank `rank`'s queries (tokens `[rank n, (rank+1) n)` of a row).
        k, v: `[B, N, H, d]` (`v` may have its own `dv`), the whole rows (gathered over CP);
            `N = cp * n`.
        cu_seqlens: host offsets `[num_docs + 1]` into the flattened `B * N` token axis,
            holding every row boundary `b N` (flash-linear-attention's convention; see
            `mhla_kernels.packing.check_cu_seqlens`, which raises on bad offsets).

    Returns `[B, n, H, dv]`. Only keys `[lo, hi)` of `document_key_range` are read; the
    others get a zero gradient.
    """
    batch, n = q.shape[:2]
    if not 0 <= rank < cp:
        raise ValueError(f"rank={rank} is not a rank of a context-parallel group of cp={cp}")
    if k.shape[:2] != (batch, cp * n) or v.shape[:2] != (batch, cp * n):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must hold the whole "
                         f"rows [B={batch}, N={cp * n}] of cp={cp} ranks of n={n} queries")
    cu = check_cu_seqlens(cu_seqlens, batch * cp * n, cp * n)
    lo, hi, one_document = document_key_range(cu, batch, n, rank, cp, causal=causal)
    q, k, v = (t.transpose(1, 2) for t in (q, k[:, lo:hi], v[:, lo:hi]))
    if one_document and not causal:
        o = F.scaled_dot_product_attention(q, k, v)
    elif one_document and (lo == rank * n or _fused_kernels_run(q, v)):
        o = _causal_after_prefix(q, k, v)
    else:
        mask = document_mask(cu, batch, n, rank, cp, lo, hi, causal=causal, device=q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)


class ParallelSoftmaxAttention(AttentionProjections):
    """`softmax(q k^T / sqrt(d)) v` with the projections of `AttentionProjections`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, causal: bool,
                 **kwargs) -> None:
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.causal = causal

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, n, hidden]` (this rank's tokens; under SP its TP shard of them).

        `cu_seqlens`: host offsets of packed documents into the global `B * N` token axis
        (see `document_attention`); attention then stays within each document.
        `positions`: rotary positions of this rank's `n` tokens, `[B, n]` or `[n]` (e.g.
        per-document positions); default the global positions `[rank n, (rank+1) n)`.
        """
        x, sp = self.enter(x), self.sequence_parallel
        positions = self.token_positions(x, positions)
        q, k, v = self.project(x, sp)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        rank, cp = self.cp_rank_size()
        if cp > 1:
            group = resolve_cp_group(self.cp_group)
            k, v = gather_from_group(k, 1, group), gather_from_group(v, 1, group)
        if cu_seqlens is not None:
            o = document_attention(q, k, v, cu_seqlens, rank=rank, cp=cp, causal=self.causal)
        elif cp == 1:
            o = _sdpa(q, k, v, causal=self.causal)
        else:
            o = cp_causal_attention(q, k, v, rank) if self.causal else _sdpa(q, k, v)
        return self.finish(o, x, sp)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor):
        if not self.causal or self.cp_rank_size()[1] != 1:
            raise ValueError("decoding needs a causal layer and no context parallelism")
        positions = self.positions(x.shape[1], 0, x.device)
        q, k, v = self.project(x)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        return self.finish(_sdpa(q, k, v, causal=True), x), KVCache(k, v)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        positions = self.positions(1, cache.position, x.device)
        q, k, v = self.project(x)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        cache.k, cache.v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
        return self.finish(_sdpa(q, cache.k, cache.v), x)
