"""The public MHLA operator: `mhla(q, k, v, mixing, block_size, ...)` (DESIGN §4)."""

from __future__ import annotations

import torch

from .torch_function import mhla_torch
from .validation import check_block_size, check_mixing, check_qkv, check_shapes, check_values

BACKENDS = ("auto", "torch", "triton")


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_HEAD_DIM = 256


def _triton_available(device: torch.device) -> bool:
    try:  # imported lazily: importing mhla_kernels should not import triton
        from .triton_mhla import triton_available
    except ImportError:
        return False
    return triton_available(device)


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """The concrete backend for `backend` and these inputs.

    "auto" takes the Triton kernels for CUDA tensors they support (float32, bfloat16,
    float16; head dims up to 256) and the PyTorch backend otherwise (CPU, float64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend == "triton" and not _triton_available(q.device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
            f"in Triton's CPU interpreter); q is on {q.device}. Use backend='torch' or 'auto'"
        )
    if backend == "auto":
        fits = (q.dtype in TRITON_DTYPES and v.dtype in TRITON_DTYPES
                and max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM)
        use_triton = q.device.type == "cuda" and fits and _triton_available(q.device)
        return "triton" if use_triton else "torch"
    return backend


def mhla(
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
    backend: str = "auto",
    check_inputs: bool = False,
    cu_seqlens=None,
) -> torch.Tensor:
    """Multi-Head Linear Attention.

    The `N` tokens form `M = ceil(N / block_size)` blocks; block `i`'s tokens read the
    mixture `sum_b Mc[i, b] S_b` of the blocks' key-value summaries (causal: `b < i`,
    plus the masked intra-block term weighted by `Mc[i, i]`).

    Args:
        q, k: `[B, N, H, d]`, already passed through the feature map.
        v: `[B, N, H, dv]`.
        mixing: `Mc`, `[M, M]` shared by all heads or `[H, M, M]` per head; a larger
            matrix (sized for `max_seq_len`) uses its leading `M x M` corner. Causal
            ignores the entries above the diagonal.
        block_size: tokens per block `C`; the last block may be ragged.
        normalize: divide by `q_t^T y_i + eps`. The denominator is only safe for
            non-negative q and k (and mixing): a feature map with negative outputs can
            drive it to zero. `check_inputs=True` verifies this (an extra pass over q
            and k, so it is off by default).
        scale: factor of the unnormalised output, default `d ** -0.5`; unused when
            `normalize=True`.
        backend: "auto" | "torch" | "triton".
        cu_seqlens: packed documents: offsets `[num_docs + 1]` into the flattened `B * N`
            tokens (every row boundary among them), or a `DocumentLayout`; each document's
            output is then `mhla` of that document alone (`packing.py`). A document may
            hold at most `M * block_size` tokens (`M` of `mixing`).
    Returns:
        `[B, N, H, dv]` in v's dtype; accumulation is float32 (float64 for float64).
    """
    if cu_seqlens is not None:
        return _mhla_documents(q, k, v, mixing, block_size, cu_seqlens, causal=causal,
                               normalize=normalize, eps=eps, scale=scale, backend=backend,
                               check_inputs=check_inputs)
    shape = check_shapes(q, k, v, mixing, block_size)
    if check_inputs:
        check_values(q, k, normalize=normalize)
    if resolve_backend(backend, q, v) == "triton":
        from .triton_mhla import mhla_triton

        return mhla_triton(q, k, v, mixing, block_size, causal=causal, normalize=normalize,
                           eps=eps, scale=scale)
    scale = shape.head_dim**-0.5 if scale is None else scale
    return mhla_torch(
        q, k, v, mixing, block_size, shape.num_blocks,
        causal=causal, normalize=normalize, eps=eps, scale=scale,
    )


def _mhla_documents(q, k, v, mixing, block_size, cu_seqlens, *, causal, normalize, eps,
                    scale, backend, check_inputs):
    """`mhla` of every document of a packed batch: its segments in slots, mixed by the
    slot mixing `W` (`packing.py`), then back in token order."""
    from .packing import resolve_layout

    check_qkv(q, k, v)
    check_block_size(block_size)
    check_mixing(mixing, q.shape[2], 1)
    layout = resolve_layout(cu_seqlens, q, mixing, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    slots = mhla(*(layout.to_slots(x) for x in (q, k, v)), layout.slot_mixing(mixing, dtype),
                 layout.slot_size, causal=causal, normalize=normalize, eps=eps, scale=scale,
                 backend=backend, check_inputs=check_inputs)
    return layout.from_slots(slots)
