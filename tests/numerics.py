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


def assert_grads_close(out, ref, out_inputs, ref_inputs=None, *, tol: float,
                       names=("q", "k", "v", "mixing"), floor: float = 1e-3, seed: int = 1):
    """Back-propagate one random `do` through `out` and `ref` and compare the gradients of
    their inputs (`ref_inputs` default: the same tensors) within `tol` relative error."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device, ref.dtype)
    got = torch.autograd.grad(out, out_inputs, do.to(out.dtype))
    want = torch.autograd.grad(ref, out_inputs if ref_inputs is None else ref_inputs, do)
    for name, ga, gr in zip(names, got, want, strict=True):
        err = rel_err(ga, gr, floor=floor)
        assert err < tol, f"d{name} rel err {err:.2e} (tolerance {tol:.0e})"
