"""Argument checks shared by every MHLA implementation.

Two tiers: `check_shapes` looks only at metadata (shapes, dtypes, devices) and runs on
every call; `check_values` reads the data (a full pass over q and k) and runs only when a
caller opts in, because the operator is memory-bound and an extra pass costs real time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MHLAShape:
    """Sizes of one MHLA call: `M = ceil(N / C)` blocks of `C` tokens."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    value_dim: int
    block_size: int
    num_blocks: int
    per_head_mixing: bool


def num_blocks(tokens: int, block_size: int) -> int:
    return max(1, math.ceil(tokens / block_size))


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} has dtype {t.dtype}; MHLA needs a floating dtype "
            "(float32, bfloat16, float16 or float64)"
        )


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an integer >= 1")


def check_mixing(mixing: torch.Tensor, heads: int, blocks: int) -> bool:
    """Validate `mixing` against `heads` and the `blocks` a call needs; True if per head."""
    _check_float("mixing", mixing)
    if mixing.dim() not in (2, 3):
        raise ValueError(
            f"mixing has shape {tuple(mixing.shape)}; expected [M, M] (shared by all heads) "
            f"or [H, M, M] (per head) with H={heads}"
        )
    if mixing.shape[-1] != mixing.shape[-2]:
        raise ValueError(f"mixing has shape {tuple(mixing.shape)}; its last two dims must be equal")
    if mixing.dim() == 3 and mixing.shape[0] != heads:
        raise ValueError(
            f"per-head mixing has {mixing.shape[0]} heads (shape {tuple(mixing.shape)}) "
            f"but q has H={heads}"
        )
    if mixing.shape[-1] < blocks:
        raise ValueError(
            f"mixing is {mixing.shape[-1]}x{mixing.shape[-1]} but the sequence has {blocks} "
            f"blocks; it must be at least {blocks}x{blocks} (a larger matrix uses its "
            "leading corner)"
        )
    return mixing.dim() == 3


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q and k `[B, N, H, d]`, v `[B, N, H, dv]`, floating, on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected 4 dims [B, N, H, d] "
                "(batch, tokens, heads, head dim)"
            )
    if q.shape != k.shape:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape [B, N, H, d]"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v {tuple(v.shape)} must match q {tuple(q.shape)} in [B, N, H] "
            "(only its last dim, dv, may differ)"
        )
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
) -> MHLAShape:
    """Metadata-only checks of an `mhla` call; returns its sizes."""
    check_qkv(q, k, v)
    if isinstance(mixing, torch.Tensor) and mixing.device != q.device:
        raise ValueError(f"mixing is on {mixing.device} but q, k, v are on {q.device}")
    check_block_size(block_size)
    b, n, h, d = q.shape
    if n < 1:
        raise ValueError(f"q has {n} tokens; MHLA needs at least one")
    m = num_blocks(n, block_size)
    per_head = check_mixing(mixing, h, m)
    return MHLAShape(b, n, h, d, v.shape[-1], block_size, m, per_head)


def check_values(q: torch.Tensor, k: torch.Tensor, *, normalize: bool) -> None:
    """Opt-in data checks: finite q and k, and non-negative ones when normalising.

    With `normalize=True` the denominator `phi(q_t)^T y_i` is a sum of products of q and
    k; a feature map with negative outputs can make it zero or negative and the output
    explode. The layer's `phi` (relu + eps, elu + 1) keeps them positive.
    """
    for name, t in (("q", q), ("k", k)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds non-finite values (inf or nan)")
        if normalize:
            low = t.min().item()
            if low < 0:
                raise ValueError(
                    f"{name} has a negative entry ({low:.3g}) with normalize=True: the "
                    "denominator phi(q)^T y can reach zero. Apply a non-negative feature "
                    "map (relu(x) + eps, elu(x) + 1) or use normalize=False"
                )
