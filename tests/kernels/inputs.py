"""Random MHLA inputs for the kernel tests (feature-mapped q, k: positive)."""

from __future__ import annotations

import torch


def make_inputs(
    b, n, h, d, dv, block_size, *, per_head=False, extra_blocks=0, dtype=torch.float64, seed=0
):
    """q, k in (0, 1] (as after relu + eps), v signed, mixing positive with `extra_blocks`
    spare rows and columns (a matrix sized for a longer max_seq_len)."""
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block_size) + extra_blocks
    q = torch.rand(b, n, h, d, generator=g, dtype=torch.float64) + 1e-3
    k = torch.rand(b, n, h, d, generator=g, dtype=torch.float64) + 1e-3
    v = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    mixing = torch.rand(*((h,) if per_head else ()), m, m, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), mixing.to(dtype)
