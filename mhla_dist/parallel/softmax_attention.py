"""Softmax attention (SDPA) for hybrid models, heads split over TP and tokens over CP.

Under context parallelism K and V are all-gathered over the CP group (DESIGN §2) and
each rank attends its own queries to the keys it needs; the gradient of the gathered K, V
is reduce-scattered back. Its traffic grows with N, unlike MHLA's summaries: keep such
layers few.

No attention mask is ever built. Without CP a causal layer is SDPA's `is_causal` (its
flash kernels). Under CP, rank `r` holds the queries of tokens `[r n, (r+1) n)`: a causal
rank needs only the key chunks `0..r`, the earlier ones unmasked and its own chunk, a
square diagonal block, with `is_causal`. `_PrefixCausalAttention` runs the two pieces with
fused kernels that also return the logsumexp of each query's scores, merges the outputs by
logsumexp (exactly), and back-propagates each piece with the merged output and logsumexp:
the flash backward recomputes the attention weights as `exp(s - lse)`, so with the global
`lse` every piece's dq, dk, dv are exact, and dq is their sum (as in ring attention).
The kernels are aten's own, the ones SDPA dispatches to: on CPU
`_scaled_dot_product_flash_attention_for_cpu` (every float dtype, float64 included), on CUDA
`_scaled_dot_product_efficient_attention` (float16, bfloat16, float32; it pads the
logsumexp to a multiple of 32 queries, which the merge carries along).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def cp_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rank: int) -> torch.Tensor:
    """Causal softmax attention of CP rank `rank`'s queries `q` `[B, n, H, d]` (tokens
    `[rank n, (rank+1) n)`) to the gathered `k`, `v` `[B, N, H, d]`; keys after the
    queries' last token are not touched (their gradient is zero)."""
    n = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    diag = slice(rank * n, (rank + 1) * n)
    if rank == 0:
        o = F.scaled_dot_product_attention(q, k[:, :, diag], v[:, :, diag], is_causal=True)
    else:
        past = slice(0, rank * n)
        o = _PrefixCausalAttention.apply(q, k[:, :, past], v[:, :, past], k[:, :, diag],
                                         v[:, :, diag])
    return o.transpose(1, 2)


class ParallelSoftmaxAttention(AttentionProjections):
    """`softmax(q k^T / sqrt(d)) v` with the projections of `AttentionProjections`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, causal: bool,
                 **kwargs) -> None:
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, sp = self.enter(x), self.sequence_parallel
        positions = self.positions(x.shape[1], device=x.device)
        q, k, v = self.project(x, sp)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        rank, cp = self.cp_rank_size()
        if cp == 1:
            return self.finish(_sdpa(q, k, v, causal=self.causal), x, sp)
        group = resolve_cp_group(self.cp_group)
        k, v = gather_from_group(k, 1, group), gather_from_group(v, 1, group)
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
