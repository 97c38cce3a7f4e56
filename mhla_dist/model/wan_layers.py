"""Layers of the Wan2.1 block: q/k RMSNorm across heads, 3-D rotary embedding, the
self-attention (MHLA or softmax) that uses them, the caption cross-attention and the
caption-token embedder.

Shapes follow `mhla_dist.parallel.tp_layers`: heads split over TP by megatron-core's
column/row-parallel linears, video tokens over CP. The caption tokens are small: every CP
and TP rank holds all of them, and the cross-attention needs no CP communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mhla_dist.parallel import gather_from_group
from mhla_dist.parallel.collectives import all_reduce_sum, copy_to_group
from mhla_dist.parallel.cp_attention import cp_mhla, resolve_cp_group
from mhla_dist.parallel.tp_layers import (
    AttentionProjections,
    column_linear,
    mixing_parameter,
    nonnegative_mixing,
)
from mhla_kernels import feature_map

from .patchify import token_positions


class TextEmbedder(nn.Module):
    """Caption tokens `[B, L, text_dim]` -> `[B, L, hidden]`: linear, GELU (tanh), linear
    (Wan's `PixArtAlphaTextProjection`)."""

    def __init__(self, text_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        for layer in (self.linear_1, self.linear_2):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text), approximate="tanh"))


def fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 at least (bf16 -> fp32, fp64 stays): where Wan computes in fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def layer_norm32(norm: nn.LayerNorm, x: torch.Tensor, tp_group=None) -> torch.Tensor:
    """`norm(x)` computed in fp32 at least (Wan's `FP32LayerNorm`), returned so.

    `tp_group`: `x` is this rank's sequence-parallel shard of the tokens, so an affine
    norm's gradients are TP-summed (every TP rank holds the whole weight)."""
    x32 = fp32(x)
    weight, bias = ((None if p is None else p.to(x32.dtype)) for p in (norm.weight, norm.bias))
    if tp_group is not None:
        weight, bias = ((None if p is None else copy_to_group(p, tp_group))
                        for p in (weight, bias))
    return F.layer_norm(x32, norm.normalized_shape, weight, bias, norm.eps)


class HeadsRMSNorm(nn.Module):
    """RMSNorm over all heads' channels of q or k (Wan's `rms_norm_across_heads`).

    Under TP each rank holds `H / tp` heads: the mean square is all-reduced over TP, and
    the weight is split like the projections' output columns (partition dim 0).
    """

    def __init__(self, num_heads: int, head_dim: int, tp: int, tp_group, eps: float) -> None:
        super().__init__()
        self.width, self.tp, self.tp_group, self.eps = num_heads * head_dim, tp, tp_group, eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim // tp))
        if tp > 1:
            self.weight.tensor_model_parallel, self.weight.partition_dim = True, 0
            self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[B, n, H_local, d]` -> the same shape, normalised over `H * d`."""
        x32 = fp32(x)
        square = x32.pow(2).sum((-2, -1), keepdim=True)
        if self.tp > 1:
            square = all_reduce_sum(square, self.tp_group)
        x32 = x32 * torch.rsqrt(square / self.width + self.eps)
        return (x32 * self.weight.to(x32.dtype).view(x.shape[-2:])).to(x.dtype)


def rope_tables(head_dim: int, patch_grid: Sequence[int], block_grid: Sequence[int],
                theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D rotary embedding for the block-major tokens: `(cos, sin)` `[N, head_dim/2]`
    float64, one angle per channel pair.

    The head channels split into frame, height and width parts of `d - 4 (d // 6)`,
    `2 (d // 6)` and `2 (d // 6)` channels; pair `i` of a part of `D` channels turns at
    `position * theta^(-2i / D)`, the position being the token's patch-grid coordinate on
    that axis.
    """
    hw = 2 * (head_dim // 6)
    parts = (head_dim - 2 * hw, hw, hw)
    pos = token_positions(patch_grid, block_grid).to(torch.float64)  # [N, 3]
    angles = []
    for axis, dim in enumerate(parts):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        angles.append(pos[:, axis, None] * freqs)
    angles = torch.cat(angles, dim=-1)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs `(2i, 2i+1)` of `x` `[B, n, H, d]` by the angles of `cos`, `sin`
    `[n, d/2]` (Wan's interleaved rotary embedding), computed in fp32 at least."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


class WanSelfAttention(AttentionProjections):
    """Wan2.1's self-attention: q/k RMSNorm across heads, 3-D RoPE, then softmax (SDPA;
    under CP over all-gathered K and V) or MHLA (`cp_mhla`, non-causal, normalised).

    In MHLA layers the rotary embedding is applied before the feature map: the features
    stay positive, so the normaliser `phi(q).y` does too; a softmax layer uses RoPE as Wan
    does, so a Wan checkpoint imported with every layer softmax is Wan itself.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, softmax: bool, block_size: int,
                 max_blocks: int, feature: str, per_head_mixing: bool,
                 mixing_init: torch.Tensor, eps: float, tp_group, cp_group,
                 sequence_parallel: bool = False) -> None:
        head_dim = hidden_size // num_heads
        super().__init__(hidden_size, num_heads, head_dim, bias=True, tp_group=tp_group,
                         cp_group=cp_group, sequence_parallel=sequence_parallel)
        self.norm_q = HeadsRMSNorm(num_heads, head_dim, self.tp, self.tp_group, eps)
        self.norm_k = HeadsRMSNorm(num_heads, head_dim, self.tp, self.tp_group, eps)
        self.softmax, self.block_size = softmax, block_size
        if not softmax:
            self.phi = feature_map(feature, normalize=True)
            self.mixing = mixing_parameter(mixing_init, num_heads, max_blocks,
                                           per_head_mixing, self.tp_group)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """`x` `[B, n, hidden]`: this rank's tokens (under SP its TP shard of them); `rope`
        the `(cos, sin)` of this CP rank's tokens."""
        x, sp = self.enter(x), self.sequence_parallel
        q, k, v = self.project(x, sp)
        q, k = (rotate_pairs(norm(t), *rope) for norm, t in ((self.norm_q, q),
                                                               (self.norm_k, k)))
        rank, cp = self.cp_rank_size()
        if self.softmax:
            if cp > 1:
                group = resolve_cp_group(self.cp_group)
                k, v = gather_from_group(k, 1, group), gather_from_group(v, 1, group)
            o = sdpa(q, k, v)
        else:
            mixing = nonnegative_mixing(self.mixing)
            if mixing.dim() == 2:
                mixing = self.replicated(mixing)
            o = cp_mhla(self.phi(q), self.phi(k), v, mixing, self.block_size, causal=False,
                        normalize=True, group=self.cp_group)
        return self.finish(o, x, sp)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of `[B, N, H, d]` tensors; `mask` `[B, L]` True = a key to attend."""
    if mask is not None:
        mask = mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


class CrossAttention(AttentionProjections):
    """Video tokens (queries) attend to the caption tokens (keys, values), softmax, with
    q/k RMSNorm across heads (Wan2.1's cross-attention).

    The caption `[B, L, hidden]` is the same on every TP and CP rank: under TP each rank
    projects it for its own heads (the gradient of the shared input is TP-summed by the
    column-parallel layer), under CP each rank's tokens attend to the whole caption.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, eps: float, tp_group,
                 sequence_parallel: bool = False) -> None:
        head_dim = hidden_size // num_heads
        super().__init__(hidden_size, num_heads, head_dim, bias=True, tp_group=tp_group,
                         sequence_parallel=sequence_parallel)
        self.norm_q = HeadsRMSNorm(num_heads, head_dim, self.tp, self.tp_group, eps)
        self.norm_k = HeadsRMSNorm(num_heads, head_dim, self.tp, self.tp_group, eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, n, hidden]` video tokens, `text` `[B, L, hidden]` embedded caption
        tokens, `text_mask` `[B, L]` bool (True = a real token; None = all are)."""
        x, sp = self.enter(x), self.sequence_parallel
        b, n, _ = x.shape
        heads = (self.local_heads, self.head_dim)
        q = column_linear(self.q_proj, x, sp).unflatten(-1, heads)
        k = self.k_proj(text)[0].unflatten(-1, heads)
        v = self.v_proj(text)[0].unflatten(-1, heads)
        o = sdpa(self.norm_q(q), self.norm_k(k), v, text_mask)
        return self.finish(o, x, sp)


def replicated_on_tokens(t: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """A per-clip tensor (conditioning) applied to this TP rank's token shard only, under
    SP: its gradient is TP-summed."""
    return copy_to_group(t, tp_group) if sequence_parallel else t
