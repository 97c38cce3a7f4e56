"""Numerical comparison helpers for the tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """`||a - b|| / max(||b||, floor)` in float64.

    `floor` keeps a tensor that is analytically ~0 (e.g. the mixing gradient of a single
    normalised block, which only eps makes non-zero) from turning rounding noise into a
    large relative error.
    """
    a, b = a.double(), b.double()
    denom = max(b.norm().item(), floor)
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
