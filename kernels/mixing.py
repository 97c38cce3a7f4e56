"""Initialisers of the block-mixing matrix `Mc` (DESIGN §1 "Initialising Mc")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

TRANSFORMS = ("linear", "cos", "exp", "local")


def causal_mixing(
    num_blocks: int, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Lower-triangular row average for language models: `Mc[i, b] = 1 / (i + 1)`, `b <= i`."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks} must be >= 1")
    rows = torch.arange(1, num_blocks + 1, dtype=dtype, device=device)
    return torch.ones(num_blocks, num_blocks, dtype=dtype, device=device).tril() / rows[:, None]


def block_grid_centres(grid: Sequence[int], *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Coordinates `[M, len(grid)]` of the blocks of a 1-D/2-D/3-D grid in block-major
    order (row-major over `(fb, hb, wb)`, the order the video patchify emits)."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def block_grid_mixing(
    grid: int | Sequence[int],
    transform: str = "linear",
    *,
    sigma: float = 1.0,
    tau: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Distance-based `Mc` `[M, M]` for a block grid (vision and video, non-causal).

    `grid`: blocks per axis, `M` or `(hb, wb)` or `(fb, hb, wb)`. With `dist` the
    Euclidean distance between block centres (in blocks) and `D` its maximum:
    `linear`: `1 - dist / D`; `cos`: `cos(pi/2 * dist / D)`; `exp`: `exp(-dist / sigma)`;
    `local`: `dist <= tau`. Each column is then normalised to sum to 1, so every block
    hands out one unit of its summary.
    """
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    if not 1 <= len(grid) <= 3 or any(not isinstance(n, int) or n < 1 for n in grid):
        raise ValueError(f"grid={grid} must be 1 to 3 positive block counts, e.g. (fb, hb, wb)")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform={transform!r} is not one of {', '.join(TRANSFORMS)}")
    if sigma <= 0 or tau < 0:
        raise ValueError(f"sigma={sigma} must be > 0 and tau={tau} >= 0")
    centres = block_grid_centres(grid, device=device)
    dist = torch.cdist(centres, centres)
    span = dist.max().clamp_min(1.0)
    if transform == "linear":
        w = 1 - dist / span
    elif transform == "cos":
        w = torch.cos(0.5 * math.pi * dist / span)
    elif transform == "exp":
        w = torch.exp(-dist / sigma)
    else:
        w = (dist <= tau + 1e-9).to(dist.dtype)
    return (w / w.sum(0, keepdim=True)).to(dtype)
