"""The three stages of MHLA as public building blocks (DESIGN §1 "Stages").

    S, z = block_summaries(k, v, C)                    # local, fp32
    T, y = mix_summaries(S, z, mixing, causal=...)     # a GEMM over the block axis
    o    = block_outputs(q, k, v, T, y, mixing, C, causal=...)

Single-device `mhla` fuses them; context parallelism all-gathers `S, z` between the first
two stages and mixes only its own rows (`block_start`, `num_rows`). Summaries are
`[B, M, H, d, dv]` and `[B, M, H, d]`, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import blocked
from .functional import resolve_backend
from .torch_function import BlockIntra, BlockSummaries, block_outputs_hf, combine_outputs
from .validation import check_block_size, check_mixing, check_qkv, check_shapes, num_blocks


class IntraBlockTerms(NamedTuple):
    """The causal intra-block numerator and denominator of some local tokens, heads-first
    blocks (`[B, H, M, C, dv]`, `[B, H, M, C, 1]` or None when not normalising)."""

    num: torch.Tensor
    den: torch.Tensor | None
    block_start: int


def block_summaries(
    k: torch.Tensor, v: torch.Tensor, block_size: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S_b = sum_{s in b} k_s v_s^T` `[B, M, H, d, dv]` and `z_b = sum k_s` `[B, M, H, d]`.

    k: `[B, N, H, d]` (after the feature map), v: `[B, N, H, dv]`; a ragged last block
    sums only its real tokens. `backend` as in `mhla`.
    """
    check_qkv(k, k, v)
    check_block_size(block_size)
    if resolve_backend(backend, k, v) == "triton":
        from .triton_mhla import block_summaries_triton

        return block_summaries_triton(k, v, block_size)
    m = num_blocks(k.shape[1], block_size)
    s, z = BlockSummaries.apply(k, v, block_size, m, blocked.compute_dtype(k, v))
    return s.transpose(1, 2), z.transpose(1, 2)


def mix_summaries(
    s: torch.Tensor,
    z: torch.Tensor,
    mixing: torch.Tensor,
    *,
    causal: bool = False,
    block_start: int = 0,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix block summaries: `T_i = sum_b Mc[i, b] S_b`, `y_i = sum_b Mc[i, b] z_b`.

    s: `[B, M, H, d, dv]`, z: `[B, M, H, d]` for all `M` blocks of the sequence.
    Computes the rows `i in [block_start, block_start + num_rows)` (default: all).
    Causal keeps only `b < i` (the diagonal is applied inside `block_outputs`).
    Returns `T` `[B, R, H, d, dv]` and `y` `[B, R, H, d]`.
    """
    if s.dim() != 5 or z.shape != s.shape[:4]:
        raise ValueError(
            f"summaries have shapes S {tuple(s.shape)} and z {tuple(z.shape)}; expected "
            "S [B, M, H, d, dv] and z [B, M, H, d]"
        )
    m, h = s.shape[1], s.shape[2]
    num_rows = m - block_start if num_rows is None else num_rows
    if block_start < 0 or num_rows < 1 or block_start + num_rows > m:
        raise ValueError(
            f"rows [{block_start}, {block_start + num_rows}) are not within the {m} blocks"
        )
    check_mixing(mixing, h, m)
    rows = blocked.mixing_rows(mixing, block_start, num_rows, m, s.dtype)
    t, y = blocked.mix(
        s.transpose(1, 2), z.transpose(1, 2), rows, causal=causal, row_start=block_start
    )
    return t.transpose(1, 2), y.transpose(1, 2)


def block_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    block_start: int = 0,
    backend: str = "auto",
    intra: IntraBlockTerms | None = None,
) -> torch.Tensor:
    """Outputs of the local tokens from their blocks' mixed summaries.

    q, k, v: the local tokens `[B, N, H, *]`, whose blocks are the global blocks
    `block_start ..`; t, y: their rows of the mix (`mix_summaries`); mixing: the whole
    matrix (causal reads its diagonal `Mc[i, i]` for the intra-block term; non-causal
    ignores it). `backend` as in `mhla`. `intra`: the causal intra-block terms already
    computed by `block_outputs_intra` (context parallelism computes them while the
    summaries are in flight); then only the mixed prefix is added here.
    Returns `[B, N, H, dv]` in v's dtype.
    """
    m = num_blocks(q.shape[1], block_size)
    check_block_size(block_size)
    if block_start < 0:
        raise ValueError(f"block_start={block_start} must be >= 0")
    shape = check_shapes(q, k, v, mixing[..., block_start:, block_start:], block_size)
    b, _, h, d = q.shape
    if t.shape != (b, m, h, d, shape.value_dim) or y.shape != (b, m, h, d):
        raise ValueError(
            f"mixed summaries have shapes T {tuple(t.shape)} and y {tuple(y.shape)}; the "
            f"{m} local blocks need T {(b, m, h, d, shape.value_dim)} and y {(b, m, h, d)}"
        )
    scale = d**-0.5 if scale is None else scale
    if intra is not None:
        if not causal or (intra.block_start, intra.num.shape[2]) != (block_start, m) \
                or (intra.den is None) == normalize:
            raise ValueError(
                "intra was computed for other arguments: it needs causal=True and the same "
                "tokens, block_start and normalize"
            )
        return combine_outputs(q, t.transpose(1, 2).to(intra.num.dtype),
                               y.transpose(1, 2).to(intra.num.dtype), (intra.num, intra.den),
                               block_size, normalize=normalize, eps=eps, scale=scale,
                               out_dtype=v.dtype)
    if resolve_backend(backend, q, v) == "triton":
        from .triton_mhla import block_outputs_triton

        return block_outputs_triton(q, k, v, t, y, mixing, block_size, causal=causal,
                                    normalize=normalize, eps=eps, scale=scale,
                                    block_start=block_start)
    dtype = blocked.compute_dtype(q, k, v, t)
    diag = blocked.mixing_diagonal(mixing, block_start, m, dtype) if causal else None
    return block_outputs_hf(
        q, k, v, t.transpose(1, 2).to(dtype), y.transpose(1, 2).to(dtype), diag, block_size,
        causal=causal, normalize=normalize, eps=eps, scale=scale,
    )


def block_outputs_intra(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    *,
    normalize: bool = True,
    block_start: int = 0,
) -> IntraBlockTerms:
    """The part of causal block outputs that needs no other block: `Mc[i, i]` times the
    masked intra-block attention (numerator and denominator). Differentiable; memory as
    the other stages (slab-recomputed). Pass the result to `block_outputs(intra=...)`.
    """
    check_block_size(block_size)
    m = num_blocks(q.shape[1], block_size)
    check_shapes(q, k, v, mixing[..., block_start:, block_start:], block_size)
    dtype = blocked.compute_dtype(q, k, v)
    diag = blocked.mixing_diagonal(mixing, block_start, m, dtype)
    num, *den = BlockIntra.apply(q, k, v, diag, block_size, normalize, dtype)
    return IntraBlockTerms(num, den[0] if den else None, block_start)
