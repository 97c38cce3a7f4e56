"""`mhla_triton`: the three stages with Triton kernels for the token-sized ones.

    S, z = block summaries (Triton)      [B, H, M, d, dv], [B, H, M, d] fp32
    T, y = Mc @ (S, z)                   a torch GEMM over the block axis (causal: b < i)
    o    = block outputs (Triton)        + Mc[i, i] * the masked intra-block term (causal)

The mix stays in torch, so autograd carries the mixing gradient
`dMc[i, b] = <dT_i, S_b> + <dy_i, z_b>` through it; the output kernel returns the gradient
of the diagonal weight of the causal intra-block term, which autograd adds to `dMc[i, i]`.
"""

from __future__ import annotations

import torch

from ..blocked import mix, mixing_rows
from ..validation import check_shapes
from .config import check_supported
from .outputs import BlockOutputsFunction
from .summaries import BlockSummariesFunction


def mhla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-Head Linear Attention with Triton kernels; the semantics of `mhla_kernels.mhla`.

    Args:
        q, k: `[B, N, H, d]` (after the feature map), v: `[B, N, H, dv]`; float32, bfloat16
            or float16, `d, dv <= 256`, any strides.
        mixing: `[M, M]` or `[H, M, M]` (its leading `M x M` corner is used).
        block_size: tokens per block; the last block may be ragged.
        scale: factor of the unnormalised output, default `d ** -0.5`.
    Returns:
        `[B, N, H, dv]` in v's dtype, accumulated in float32.
    """
    shape = check_shapes(q, k, v, mixing, block_size)
    check_supported(q, k, v)
    m = shape.num_blocks
    scale = shape.head_dim**-0.5 if scale is None else scale
    s, z = BlockSummariesFunction.apply(k, v, block_size)
    rows = mixing_rows(mixing, 0, m, m, torch.float32)
    t, y = mix(s, z, rows, causal=causal, row_start=0)
    diag = rows.diagonal(dim1=-2, dim2=-1) if causal else None
    return BlockOutputsFunction.apply(
        q, k, v, t, y, diag, block_size, causal, normalize, eps, scale
    )
