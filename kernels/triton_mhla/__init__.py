"""Triton kernels for MHLA (forward and backward of the two token-sized stages).

    from mhla_kernels.triton_mhla import mhla_triton, triton_available
    o = mhla_triton(q, k, v, mixing, block_size, causal=True)

Runs on CUDA, or on CPU under `TRITON_INTERPRET=1` (set before this package is imported).
"""

from .config import triton_available
from .mhla import mhla_triton
from .outputs import block_outputs_triton
from .summaries import block_summaries_triton

__all__ = ["block_outputs_triton", "block_summaries_triton", "mhla_triton", "triton_available"]
