"""Launch settings shared by the MHLA Triton kernels: availability, tile sizes, dot dtype.

Triton decides at decoration time whether a kernel is compiled or interpreted
(`TRITON_INTERPRET=1`), so the interpreter must be switched on before this package is
imported; `interpreting()` reports what the process asked for.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None
    tl = None

# Tokens per tile: the sub-chunk of the causal intra-block term. 64 keeps the c x c score
# tile small enough to sit in registers beside a d x dv state tile.
TOKEN_TILE = 64
# The fp32 state tile of the output kernels holds the whole (padded) head dim times a
# slice of dv; this bounds its elements (32 KiB of registers per program).
STATE_TILE_ELEMENTS = 8192
# Tile of d and dv in the summary kernels.
SUMMARY_TILE = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str) -> bool:
    """True when triton imports and `device` is CUDA, or `TRITON_INTERPRET=1` is set."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreting()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def token_tile(block_size: int) -> int:
    """Tokens per tile: at least 16 (the smallest `tl.dot`), at most `TOKEN_TILE`."""
    return max(16, min(TOKEN_TILE, next_power_of_2(block_size)))


def head_tile(dim: int) -> int:
    """The whole head dim padded to a power of two (masked beyond `dim`)."""
    if dim > 256:
        raise ValueError(f"head dim {dim} is not supported by the Triton kernels (at most 256)")
    return max(16, next_power_of_2(dim))


def value_tile(head_dim_tile: int, value_dim: int) -> int:
    """A dv slice such that the `[head_dim_tile, slice]` fp32 state fits the budget."""
    return max(16, min(next_power_of_2(value_dim), STATE_TILE_ELEMENTS // head_dim_tile, 64))


def summary_tile(dim: int) -> int:
    return max(16, min(SUMMARY_TILE, next_power_of_2(dim)))


def check_supported(*tensors: torch.Tensor) -> None:
    """Raise a clear error for inputs the kernels do not take (dtype, head dim)."""
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"the Triton kernels take float32, bfloat16 or float16 inputs, got {t.dtype}; "
                "use backend='torch' for float64"
            )
        if t.shape[-1] > 256:
            raise ValueError(
                f"head dim {t.shape[-1]} is not supported by the Triton kernels (at most 256); "
                "use backend='torch'"
            )


def dot_dtype(dtype: torch.dtype):
    """The dtype the kernels feed `tl.dot`: the input dtype on a GPU (tensor cores).

    The interpreter computes bf16 `tl.dot` wrongly (numpy has no bf16), so under
    `TRITON_INTERPRET=1` bf16 operands are widened to fp32; loads, stores and every
    elementwise step still run in bf16 / fp32 as on a GPU.
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    if dtype == torch.float32:
        return tl.float32
    raise TypeError(
        f"the Triton kernels take float32, bfloat16 or float16 inputs, got {dtype}; "
        "use backend='torch' for float64"
    )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32, to match the torch backend."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_warps(tile_elements: int) -> int:
    return 8 if tile_elements >= 8192 else 4
