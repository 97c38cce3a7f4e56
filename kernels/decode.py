"""Recurrent (decode) form of causal MHLA: one token at a time, equal to the parallel form.

State per sequence and head: the finished block summaries (`M_max x d x dv`), the running
summary of the current block, and the mixed prefix `P_i = sum_{b<i} Mc[i, b] S_b`,
computed once when block `i` starts. A step between boundaries costs `O(d dv)`; the
boundary costs `O(i d dv)` once per `C` tokens.

This is an inference path: the state is updated in place, outside autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocked import compute_dtype, mixing_rows, summaries, to_blocks
from .validation import check_block_size, check_mixing, check_qkv, num_blocks


@dataclass
class MHLADecodeState:
    """Decode state of a batch of sequences that share a position.

    block_kv `[B, M_max, H, d, dv]`, block_k `[B, M_max, H, d]`: summaries of finished
    blocks; current_kv `[B, H, d, dv]`, current_k `[B, H, d]`: the block being filled;
    prefix_kv, prefix_k: its mixed prefix; position: tokens consumed so far.
    """

    block_kv: torch.Tensor
    block_k: torch.Tensor
    current_kv: torch.Tensor
    current_k: torch.Tensor
    prefix_kv: torch.Tensor
    prefix_k: torch.Tensor
    block_size: int
    position: int = 0

    @property
    def max_blocks(self) -> int:
        return self.block_kv.shape[1]

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int,
        block_size: int,
        max_blocks: int,
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> MHLADecodeState:
        check_block_size(block_size)
        z = dict(dtype=dtype, device=device)
        return cls(
            block_kv=torch.zeros(batch, max_blocks, heads, head_dim, value_dim, **z),
            block_k=torch.zeros(batch, max_blocks, heads, head_dim, **z),
            current_kv=torch.zeros(batch, heads, head_dim, value_dim, **z),
            current_k=torch.zeros(batch, heads, head_dim, **z),
            prefix_kv=torch.zeros(batch, heads, head_dim, value_dim, **z),
            prefix_k=torch.zeros(batch, heads, head_dim, **z),
            block_size=block_size,
        )

    @classmethod
    @torch.no_grad()
    def from_prefill(
        cls, k: torch.Tensor, v: torch.Tensor, mixing: torch.Tensor, block_size: int
    ) -> MHLADecodeState:
        """The state after the prompt `k` `[B, N, H, d]`, `v` `[B, N, H, dv]` (N >= 1).

        The prompt's outputs come from the parallel `mhla`; this only summarises it.
        """
        check_qkv(k, k, v)
        check_block_size(block_size)
        b, n, h, d = k.shape
        m = num_blocks(n, block_size)
        check_mixing(mixing, h, m)
        dtype = compute_dtype(k, v)
        state = cls.empty(b, h, d, v.shape[-1], block_size, mixing.shape[-1], dtype=dtype,
                          device=k.device)
        s, z = summaries(*(to_blocks(x, block_size, m, dtype) for x in (k, v)))
        state.block_kv[:, : m - 1] = s[:, :, : m - 1].transpose(1, 2)
        state.block_k[:, : m - 1] = z[:, :, : m - 1].transpose(1, 2)
        state.current_kv, state.current_k = s[:, :, m - 1].clone(), z[:, :, m - 1].clone()
        state.position = n
        state._load_prefix(mixing, m - 1)
        return state

    def _load_prefix(self, mixing: torch.Tensor, block: int) -> None:
        """`P_i`, `p_i` of block `i = block` from the finished summaries of blocks `< i`."""
        row = mixing_rows(mixing, block, 1, block, self.block_kv.dtype)[:, 0]  # [1 or H, i]
        # [B, i, H, *] weighted by row[h, b], summed over b.
        w = row.transpose(0, 1)[None]  # [1, i, 1 or H]
        self.prefix_kv = (self.block_kv[:, :block] * w[..., None, None]).sum(1)
        self.prefix_k = (self.block_k[:, :block] * w[..., None]).sum(1)


@torch.no_grad()
def mhla_decode_step(
    state: MHLADecodeState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
) -> torch.Tensor:
    """Consume one token per sequence: q, k `[B, H, d]`, v `[B, H, dv]` -> o `[B, H, dv]`.

    Equal to row `state.position` of the causal `mhla` over the whole sequence so far.
    Updates `state` in place.
    """
    c, t = state.block_size, state.position
    block = t // c
    limit = min(state.max_blocks, mixing.shape[-1])
    if block >= limit:
        raise ValueError(
            f"token {t} falls in block {block}, beyond the {limit} blocks of the mixing "
            f"matrix (max_seq_len = blocks x block_size = {limit * c})"
        )
    b, h, d = state.current_k.shape
    if q.shape != (b, h, d) or k.shape != (b, h, d) or v.shape[:2] != (b, h):
        raise ValueError(
            f"decode step takes q, k [B, H, d] = {(b, h, d)} and v [B, H, dv]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if t > 0 and t % c == 0:
        # Block `block - 1` is complete: file it and mix the prefix of the new block.
        state.block_kv[:, block - 1] = state.current_kv
        state.block_k[:, block - 1] = state.current_k
        state.current_kv = torch.zeros_like(state.current_kv)
        state.current_k = torch.zeros_like(state.current_k)
        state._load_prefix(mixing, block)
    dtype = state.current_kv.dtype
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    state.current_kv += kf[..., :, None] * vf[..., None, :]
    state.current_k += kf
    diag = mixing[..., block, block].to(dtype)
    w = diag.reshape(1, -1, 1) if diag.dim() == 1 else diag.reshape(1, 1, 1)
    kv = state.prefix_kv + w[..., None] * state.current_kv
    num = (qf[..., None, :] @ kv).squeeze(-2)
    state.position = t + 1
    if not normalize:
        return (num * (d**-0.5 if scale is None else scale)).to(v.dtype)
    den = (qf * (state.prefix_k + w * state.current_k)).sum(-1, keepdim=True)
    return (num / (den + eps)).to(v.dtype)
