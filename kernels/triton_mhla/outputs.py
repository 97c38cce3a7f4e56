"""Stage 3 in Triton: block outputs from the mixed summaries (kernels in `outputs_kernels.py`).

`o_t = q_t^T T_i / (q_t^T y_i + eps)` (or `scale * q_t^T T_i`); causal adds the masked
intra-block term weighted by `w_i = Mc[i, i]`. q, k, v `[B, N, H, *]` are read in place;
T `[B, H, M, d, dv]` and y `[B, H, M, d]` may have any strides (heads first or not).

The backward recomputes the running intra-block state instead of saving it. It saves the
inputs, the output `o` (which the next layer keeps alive anyway) and, normalized, the
per-token denominator (fp32, `1/dv` of o's size): `dden_t = -(do_t . o_t) / den_t` needs
them, as flash attention needs its output and log-sum-exp.
"""

from __future__ import annotations

import torch
import triton

from ..blocked import mixing_diagonal
from ..validation import check_shapes, num_blocks
from . import config
from .outputs_kernels import (
    block_outputs_bwd_kernel_dkv,
    block_outputs_bwd_kernel_dq,
    block_outputs_fwd_kernel_o,
)


def _tiles(q: torch.Tensor, v: torch.Tensor, block_size: int, causal: bool) -> dict:
    d, dv = q.shape[-1], v.shape[-1]
    bt, bk = config.token_tile(block_size), config.head_tile(d)
    bv = config.value_tile(bk, dv)
    nt = triton.cdiv(block_size, bt)
    return dict(
        bt=bt, bk=bk, bv=bv, nt=nt, nv=triton.cdiv(dv, bv),
        # Causal programs carry the running state through every tile of their block.
        progs_per_block=1 if causal else nt,
        tiles_per_prog=nt if causal else 1,
        meta=dict(
            BT=bt, BK=bk, BV=bv, CAUSAL=causal, DT=config.dot_dtype(q.dtype),
            PREC=config.dot_precision(q.dtype), num_warps=config.num_warps(bk * bv),
        ),
    )


def _diag_args(diag: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """The diagonal `[1 or H, M]` and its strides (head stride 0 when shared)."""
    if diag is None:
        return like, 0, 0
    return diag, (diag.stride(0) if diag.shape[0] > 1 else 0), diag.stride(1)


def block_outputs_fwd(
    q, k, v, t, y, diag, block_size: int, *, causal: bool, normalize: bool, eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o `[B, N, H, dv]` in v's dtype and the denominator `[B, H, N]` fp32 (normalized)."""
    b, n, h, d = q.shape
    dv, m = v.shape[-1], t.shape[2]
    tiles = _tiles(q, v, block_size, causal)
    o = torch.empty(b, n, h, dv, device=q.device, dtype=v.dtype)
    den = torch.empty(b, h, n if normalize else 1, device=q.device, dtype=torch.float32)
    w, stride_wh, stride_wm = _diag_args(diag, t)
    grid = (m * tiles["progs_per_block"], b * h, tiles["nv"])
    block_outputs_fwd_kernel_o[grid](
        q, k, v, t, y, w, o, den,
        n, block_size, h, d, dv, tiles["nt"], tiles["progs_per_block"], tiles["tiles_per_prog"],
        eps, scale,
        *q.stride(), *k.stride(), *v.stride(), *t.stride(), *y.stride(), stride_wh, stride_wm,
        *o.stride(), NORMALIZE=normalize, **tiles["meta"],
    )
    return o, den


def block_outputs_bwd(
    q, k, v, t, y, diag, o, den, do, block_size: int, *, causal: bool, normalize: bool,
    scale: float,
) -> tuple:
    """dq, dk, dv (None unless causal), dT, dy (fp32, heads first), d diag (causal)."""
    b, n, h, d = q.shape
    dv_dim, m = v.shape[-1], t.shape[2]
    tiles = _tiles(q, v, block_size, causal)
    nv = tiles["nv"]
    w, stride_wh, stride_wm = _diag_args(diag, t)
    if normalize:
        delta = (do.float() * o.float()).sum(-1)
    else:
        delta = den.new_zeros(1, 1, 1)
    dq_part = torch.empty(nv, b, n, h, d, device=q.device, dtype=torch.float32)
    grid = (m * tiles["progs_per_block"], b * h, nv)
    block_outputs_bwd_kernel_dq[grid](
        k, v, t, y, w, do, den, delta, dq_part,
        n, block_size, h, d, dv_dim, tiles["nt"], tiles["progs_per_block"],
        tiles["tiles_per_prog"], scale,
        *k.stride(), *v.stride(), *t.stride(), *y.stride(), stride_wh, stride_wm,
        *do.stride(), *delta.stride(), *dq_part.stride(), NORMALIZE=normalize, **tiles["meta"],
    )
    dt = torch.empty(b, h, m, d, dv_dim, device=q.device, dtype=torch.float32)
    dy = torch.empty(b, h, m, d, device=q.device, dtype=torch.float32)
    if causal:
        dk_part = torch.empty(nv, b, n, h, d, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(v)
        dw = torch.empty(nv, b * h, m, device=q.device, dtype=torch.float32)
    else:  # never touched: the non-causal outputs do not read k or v
        dk_part, dv, dw = dq_part, do, dt
    block_outputs_bwd_kernel_dkv[(m, b * h, nv)](
        q, k, v, w, do, den, delta, dk_part, dv, dt, dy, dw,
        n, block_size, h, d, dv_dim, tiles["nt"], m, scale,
        *q.stride(), *k.stride(), *v.stride(), stride_wh, stride_wm, *do.stride(),
        *delta.stride(), *dk_part.stride(), *dv.stride(), *dt.stride(), *dy.stride(),
        NORMALIZE=normalize, **tiles["meta"],
    )
    dq = (dq_part[0] if nv == 1 else dq_part.sum(0)).to(q.dtype)
    if not causal:
        return dq, None, None, dt, dy, None
    dk = (dk_part[0] if nv == 1 else dk_part.sum(0)).to(k.dtype)
    ddiag = dw.sum(0).view(b, h, m).sum(0)
    if diag.shape[0] == 1:
        ddiag = ddiag.sum(0, keepdim=True)
    return dq, dk, dv, dt, dy, ddiag.to(diag.dtype)


class BlockOutputsFunction(torch.autograd.Function):
    """`(q, k, v, T, y, diag) -> o`; diag `[1 or H, M]` is `Mc[i, i]` (causal) or None."""

    @staticmethod
    def forward(ctx, q, k, v, t, y, diag, block_size, causal, normalize, eps, scale):
        o, den = block_outputs_fwd(
            q, k, v, t, y, diag, block_size,
            causal=causal, normalize=normalize, eps=eps, scale=scale,
        )
        ctx.save_for_backward(q, k, v, t, y, diag, o, den)
        ctx.opts = dict(block_size=block_size, causal=causal, normalize=normalize, scale=scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, t, y, diag, o, den = ctx.saved_tensors
        opts = ctx.opts
        dq, dk, dv, dt, dy, ddiag = block_outputs_bwd(
            q, k, v, t, y, diag, o, den, do, opts["block_size"],
            causal=opts["causal"], normalize=opts["normalize"], scale=opts["scale"],
        )
        return dq, dk, dv, dt, dy, ddiag, None, None, None, None, None


def block_outputs_triton(
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
) -> torch.Tensor:
    """The Triton twin of `mhla_kernels.block_outputs` (same arguments, differentiable).

    q, k, v: the local tokens `[B, N, H, *]` (global blocks `block_start ..`); t `[B, M, H,
    d, dv]`, y `[B, M, H, d]`: their rows of the mix. Returns `[B, N, H, dv]` in v's dtype.
    """
    m = num_blocks(q.shape[1], block_size)
    shape = check_shapes(q, k, v, mixing[..., block_start:, block_start:], block_size)
    config.check_supported(q, k, v)
    if t.shape != (q.shape[0], m, q.shape[2], shape.head_dim, shape.value_dim):
        raise ValueError(f"T has shape {tuple(t.shape)}; the {m} local blocks need "
                         f"{(q.shape[0], m, q.shape[2], shape.head_dim, shape.value_dim)}")
    scale = shape.head_dim**-0.5 if scale is None else scale
    diag = mixing_diagonal(mixing, block_start, m, torch.float32) if causal else None
    return BlockOutputsFunction.apply(
        q, k, v, t.transpose(1, 2), y.transpose(1, 2), diag, block_size, causal, normalize,
        eps, scale,
    )
