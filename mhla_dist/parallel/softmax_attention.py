"""Softmax attention (SDPA) for hybrid models, heads split over TP and tokens over CP.

Under context parallelism K and V are all-gathered over the CP group (DESIGN §2) and
each rank attends its own queries to every key (causal: the keys up to its tokens'
global positions); the gradient of the gathered K, V is reduce-scattered back. Its
traffic grows with N, unlike MHLA's summaries: keep such layers few.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .collectives import gather_from_group
from .cp_attention import resolve_cp_group
from .tp_layers import AttentionProjections


@dataclass
class KVCache:
    k: torch.Tensor  # [B, T, H, d]
    v: torch.Tensor

    @property
    def position(self) -> int:
        return self.k.shape[1]


def _sdpa(q, k, v, mask):
    """`[B, N, H, d]` in and out; `mask` `[Nq, Nk]` (True = attend) or None."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)
    return o.transpose(1, 2)


class ParallelSoftmaxAttention(AttentionProjections):
    """`softmax(q k^T / sqrt(d)) v` with the projections of `AttentionProjections`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, causal: bool,
                 **kwargs) -> None:
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        positions = self.positions(n, device=x.device)
        q, k, v = self.project(x)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        if self.cp_rank_size()[1] > 1:
            group = resolve_cp_group(self.cp_group)
            k, v = gather_from_group(k, 1, group), gather_from_group(v, 1, group)
        mask = None
        if self.causal:
            keys = torch.arange(k.shape[1], device=x.device)
            mask = keys[None, :] <= positions[:, None]
        return self.finish(_sdpa(q, k, v, mask), x)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor):
        if not self.causal or self.cp_rank_size()[1] != 1:
            raise ValueError("decoding needs a causal layer and no context parallelism")
        positions = self.positions(x.shape[1], 0, x.device)
        q, k, v = self.project(x)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        return self.finish(_sdpa(q, k, v, mask), x), KVCache(k, v)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        positions = self.positions(1, cache.position, x.device)
        q, k, v = self.project(x)
        q, k = self.maybe_rotate(q, positions), self.maybe_rotate(k, positions)
        cache.k, cache.v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
        return self.finish(_sdpa(q, cache.k, cache.v, None), x)
