"""Stage 1 in Triton: block summaries `S_b = sum_{s in b} k_s v_s^T`, `z_b = sum k_s`.

k: `[B, N, H, d]`, v: `[B, N, H, dv]` read in place through their strides; the summaries
are fp32, heads first: S `[B, H, M, d, dv]`, z `[B, H, M, d]` (so the mix over the block
axis is a plain batched GEMM). Program ids are widened to int64 before they meet a
stride: `b * stride_b + t * stride_n` passes 2^31 at long N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validation import check_block_size, check_qkv
from . import config


@triton.jit
def block_summaries_fwd_kernel_sz(
    k_ptr, v_ptr, s_ptr, z_ptr,
    N, C, H, D, DV, NV,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_sb, stride_sh, stride_sm, stride_sd, stride_se,
    stride_zb, stride_zh, stride_zm, stride_zd,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """One `[BK, BV]` tile of `S` for one block of one (batch, head); dv tile 0 also
    writes the `[BK]` slice of `z`."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_kv = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_k, i_v = i_kv // NV, i_kv % NV
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < D, rv < DV
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    start = i_m * C
    end = tl.minimum(start + C, N)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for t0 in range(start, end, BT):
        rt = t0 + tl.arange(0, BT)
        mt = rt < end
        k = tl.load(k_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
                    mask=mt[:, None] & mk[None, :], other=0.0)
        v = tl.load(v_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
                    mask=mt[:, None] & mv[None, :], other=0.0)
        acc += tl.dot(tl.trans(k.to(DT)), v.to(DT), input_precision=PREC)
        z += tl.sum(k.to(tl.float32), 0)
    s_base = s_ptr + i_b * stride_sb + i_h * stride_sh + i_m * stride_sm
    tl.store(s_base + rk[:, None] * stride_sd + rv[None, :] * stride_se, acc,
             mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        z_base = z_ptr + i_b * stride_zb + i_h * stride_zh + i_m * stride_zm
        tl.store(z_base + rk * stride_zd, z, mask=mk)


@triton.jit
def block_summaries_bwd_kernel_dk(
    v_ptr, ds_ptr, dz_ptr, dk_ptr,
    N, C, H, D, DV, NT, NV,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_sb, stride_sh, stride_sm, stride_sd, stride_se,
    stride_zb, stride_zh, stride_zm, stride_zd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """`dk_s = dS_b v_s + dz_b` for one token tile and one `[BK]` slice of d."""
    i_mt = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_k = tl.program_id(2).to(tl.int64)
    i_m, i_t = i_mt // NT, i_mt % NT
    i_b, i_h = i_bh // H, i_bh % H
    pos = i_t * BT + tl.arange(0, BT)
    rt = i_m * C + pos
    mt = (pos < C) & (rt < N)
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < D
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    s_base = ds_ptr + i_b * stride_sb + i_h * stride_sh + i_m * stride_sm
    z_base = dz_ptr + i_b * stride_zb + i_h * stride_zh + i_m * stride_zm
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(0, NV):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < DV
        v = tl.load(v_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
                    mask=mt[:, None] & mv[None, :], other=0.0)
        ds = tl.load(s_base + rk[:, None] * stride_sd + rv[None, :] * stride_se,
                     mask=mk[:, None] & mv[None, :], other=0.0)
        acc += tl.dot(v.to(DT), tl.trans(ds.to(DT)), input_precision=PREC)
    dz = tl.load(z_base + rk * stride_zd, mask=mk, other=0.0)
    acc += dz[None, :]
    dk_base = dk_ptr + i_b * stride_kb + i_h * stride_kh
    tl.store(dk_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
             acc.to(dk_ptr.dtype.element_ty), mask=mt[:, None] & mk[None, :])


@triton.jit
def block_summaries_bwd_kernel_dv(
    k_ptr, ds_ptr, dv_ptr,
    N, C, H, D, DV, NT, NK,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_sb, stride_sh, stride_sm, stride_sd, stride_se,
    stride_vb, stride_vn, stride_vh, stride_vd,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """`dv_s = dS_b^T k_s` for one token tile and one `[BV]` slice of dv."""
    i_mt = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    i_m, i_t = i_mt // NT, i_mt % NT
    i_b, i_h = i_bh // H, i_bh % H
    pos = i_t * BT + tl.arange(0, BT)
    rt = i_m * C + pos
    mt = (pos < C) & (rt < N)
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < DV
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    s_base = ds_ptr + i_b * stride_sb + i_h * stride_sh + i_m * stride_sm
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, NK):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < D
        k = tl.load(k_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
                    mask=mt[:, None] & mk[None, :], other=0.0)
        ds = tl.load(s_base + rk[:, None] * stride_sd + rv[None, :] * stride_se,
                     mask=mk[:, None] & mv[None, :], other=0.0)
        acc += tl.dot(k.to(DT), ds.to(DT), input_precision=PREC)
    dv_base = dv_ptr + i_b * stride_vb + i_h * stride_vh
    tl.store(dv_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
             acc.to(dv_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


def block_summaries_fwd(
    k: torch.Tensor, v: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """S `[B, H, M, d, dv]`, z `[B, H, M, d]` in fp32."""
    b, n, h, d = k.shape
    dv = v.shape[-1]
    m = max(1, -(-n // block_size))
    s = torch.empty(b, h, m, d, dv, device=k.device, dtype=torch.float32)
    z = torch.empty(b, h, m, d, device=k.device, dtype=torch.float32)
    bt, bk, bv = config.token_tile(block_size), config.summary_tile(d), config.summary_tile(dv)
    nk, nv = triton.cdiv(d, bk), triton.cdiv(dv, bv)
    block_summaries_fwd_kernel_sz[(m, b * h, nk * nv)](
        k, v, s, z, n, block_size, h, d, dv, nv,
        *k.stride(), *v.stride(), *s.stride(), *z.stride(),
        BT=bt, BK=bk, BV=bv, DT=config.dot_dtype(k.dtype), PREC=config.dot_precision(k.dtype),
        num_warps=config.num_warps(bk * bv),
    )
    return s, z


def block_summaries_bwd(
    k: torch.Tensor, v: torch.Tensor, ds: torch.Tensor, dz: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv (in k's and v's dtypes) from dS `[B, H, M, d, dv]`, dz `[B, H, M, d]`."""
    b, n, h, d = k.shape
    dv_dim = v.shape[-1]
    m = ds.shape[2]
    bt, bk, bv = config.token_tile(block_size), config.summary_tile(d), config.summary_tile(dv_dim)
    nt, nk, nv = triton.cdiv(block_size, bt), triton.cdiv(d, bk), triton.cdiv(dv_dim, bv)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dt, prec = config.dot_dtype(k.dtype), config.dot_precision(k.dtype)
    block_summaries_bwd_kernel_dk[(m * nt, b * h, nk)](
        v, ds, dz, dk, n, block_size, h, d, dv_dim, nt, nv,
        *v.stride(), *ds.stride(), *dz.stride(), *dk.stride(),
        BT=bt, BK=bk, BV=bv, DT=dt, PREC=prec, num_warps=config.num_warps(bt * bk),
    )
    block_summaries_bwd_kernel_dv[(m * nt, b * h, nv)](
        k, ds, dv, n, block_size, h, d, dv_dim, nt, nk,
        *k.stride(), *ds.stride(), *dv.stride(),
        BT=bt, BK=bk, BV=bv, DT=dt, PREC=prec, num_warps=config.num_warps(bt * bv),
    )
    return dk, dv


class BlockSummariesFunction(torch.autograd.Function):
    """`(k, v) -> (S, z)` heads first; the backward recomputes nothing and saves k, v."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, block_size: int):
        s, z = block_summaries_fwd(k, v, block_size)
        ctx.save_for_backward(k, v)
        ctx.block_size = block_size
        return s, z

    @staticmethod
    def backward(ctx, ds: torch.Tensor | None, dz: torch.Tensor | None):
        k, v = ctx.saved_tensors
        m = max(1, -(-k.shape[1] // ctx.block_size))
        b, _, h, d = k.shape
        if ds is None:
            ds = torch.zeros(b, h, m, d, v.shape[-1], device=k.device, dtype=torch.float32)
        if dz is None:
            dz = torch.zeros(b, h, m, d, device=k.device, dtype=torch.float32)
        dk, dv = block_summaries_bwd(k, v, ds.float(), dz.float(), ctx.block_size)
        return dk, dv, None


def block_summaries_triton(
    k: torch.Tensor, v: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S_b = sum_{s in b} k_s v_s^T` `[B, M, H, d, dv]` and `z_b = sum k_s` `[B, M, H, d]`.

    The Triton twin of `mhla_kernels.block_summaries` (fp32, differentiable); the results
    are views of heads-first tensors.
    """
    check_qkv(k, k, v)
    check_block_size(block_size)
    config.check_supported(k, v)
    s, z = BlockSummariesFunction.apply(k, v, block_size)
    return s.transpose(1, 2), z.transpose(1, 2)
