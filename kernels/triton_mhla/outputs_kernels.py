"""Triton kernels of stage 3, block outputs (host code in `outputs.py`).

Per block `i` with mixed summaries `T_i [d, dv]`, `y_i [d]` and diagonal weight
`w = Mc[i, i]` (causal only), a token `t` of sub-chunk (token tile) `j` gets

    num_t = q_t^T (T_i + w H_j) + w sum_{s in j, s <= t} (q_t . k_s) v_s
    den_t = q_t . (y_i + w h_j) + w sum_{s in j, s <= t} q_t . k_s + eps

where `H_j = sum k v^T`, `h_j = sum k` over the block's earlier tiles: a running state,
so a block of C tokens costs O(C d dv), never O(C^2 d). Each program holds the whole
(padded) head dim `BK` and one `BV` slice of dv. Causal programs walk all tiles of one
block in order; non-causal programs take one tile each. Gradients (`dnum`, `dden` the
gradients of `num`, `den`):

    dq_t   = (T_i + w H_j) dnum_t + dden_t (y_i + w h_j) + w sum_{s<=t} (dnum_t . v_s + dden_t) k_s
    dT_i   = sum_t q_t dnum_t^T,  dy_i = sum_t dden_t q_t
    X_s    = sum_{t >= s in block} (dnum_t . v_s + dden_t) q_t;  dk_s = w X_s,  dw = sum_s k_s . X_s
    dv_s   = w sum_{t >= s in block} (q_t . k_s) dnum_t

`dk` and `dv` need the later tiles' `sum q dnum^T`: the dkv kernel walks the tiles in
reverse. Terms in `dden` are added by the dv slice 0 only, since `dden` is already a sum
over all of dv; the per-slice partial sums of dq, dk and dw are added on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_outputs_fwd_kernel_o(
    q_ptr, k_ptr, v_ptr, t_ptr, y_ptr, w_ptr, o_ptr, den_ptr,
    N, C, H, D, DV, NT, PROGS_PER_BLOCK, TILES_PER_PROG, eps, scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_th, stride_tm, stride_td, stride_te,
    stride_yb, stride_yh, stride_ym, stride_yd,
    stride_wh, stride_wm,
    stride_ob, stride_on, stride_oh, stride_od,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    i_m, i_part = i_p // PROGS_PER_BLOCK, i_p % PROGS_PER_BLOCK
    i_b, i_h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < D, rv < DV
    state = tl.load(t_ptr + i_b * stride_tb + i_h * stride_th + i_m * stride_tm
                    + rk[:, None] * stride_td + rv[None, :] * stride_te,
                    mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    zsum = tl.load(y_ptr + i_b * stride_yb + i_h * stride_yh + i_m * stride_ym + rk * stride_yd,
                   mask=mk, other=0.0).to(tl.float32)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    o_base = o_ptr + i_b * stride_ob + i_h * stride_oh
    w = 0.0
    if CAUSAL:
        w = tl.load(w_ptr + i_h * stride_wh + i_m * stride_wm).to(tl.float32)
    first = i_part * TILES_PER_PROG
    last = tl.minimum(first + TILES_PER_PROG, NT)
    for j in range(first, last):
        pos = j * BT + tl.arange(0, BT)
        rt = i_m * C + pos
        mt = (pos < C) & (rt < N)
        q = tl.load(q_base + rt[:, None] * stride_qn + rk[None, :] * stride_qd,
                    mask=mt[:, None] & mk[None, :], other=0.0)
        num = tl.dot(q.to(DT), state.to(DT), input_precision=PREC)
        den = tl.sum(q.to(tl.float32) * zsum[None, :], 1)
        if CAUSAL:
            k = tl.load(k_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
                        mask=mt[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
                        mask=mt[:, None] & mv[None, :], other=0.0)
            a = tl.dot(q.to(DT), tl.trans(k.to(DT)), input_precision=PREC)
            a = tl.where(pos[:, None] >= pos[None, :], a, 0.0)
            num += w * tl.dot(a.to(DT), v.to(DT), input_precision=PREC)
            den += w * tl.sum(a, 1)
            state += w * tl.dot(tl.trans(k.to(DT)), v.to(DT), input_precision=PREC)
            zsum += w * tl.sum(k.to(tl.float32), 0)
        if NORMALIZE:
            den += eps
            o = num / den[:, None]
            if i_v == 0:
                tl.store(den_ptr + i_bh * N + rt, den, mask=mt)
        else:
            o = num * scale
        tl.store(o_base + rt[:, None] * stride_on + rv[None, :] * stride_od,
                 o.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def block_outputs_bwd_kernel_dq(
    k_ptr, v_ptr, t_ptr, y_ptr, w_ptr, do_ptr, den_ptr, delta_ptr, dq_ptr,
    N, C, H, D, DV, NT, PROGS_PER_BLOCK, TILES_PER_PROG, scale,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_th, stride_tm, stride_td, stride_te,
    stride_yb, stride_yh, stride_ym, stride_yd,
    stride_wh, stride_wm,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_eb, stride_en, stride_eh,
    stride_part, stride_pb, stride_pn, stride_ph, stride_pd,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq for the dv slice `i_v`, into the fp32 partial buffer `dq[i_v]`."""
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    i_m, i_part = i_p // PROGS_PER_BLOCK, i_p % PROGS_PER_BLOCK
    i_b, i_h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < D, rv < DV
    first_slice = (i_v == 0).to(tl.float32)
    state = tl.load(t_ptr + i_b * stride_tb + i_h * stride_th + i_m * stride_tm
                    + rk[:, None] * stride_td + rv[None, :] * stride_te,
                    mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    zsum = tl.load(y_ptr + i_b * stride_yb + i_h * stride_yh + i_m * stride_ym + rk * stride_yd,
                   mask=mk, other=0.0).to(tl.float32)
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    g_base = do_ptr + i_b * stride_gb + i_h * stride_gh
    dq_base = dq_ptr + i_v * stride_part + i_b * stride_pb + i_h * stride_ph
    w = 0.0
    if CAUSAL:
        w = tl.load(w_ptr + i_h * stride_wh + i_m * stride_wm).to(tl.float32)
    first = i_part * TILES_PER_PROG
    last = tl.minimum(first + TILES_PER_PROG, NT)
    for j in range(first, last):
        pos = j * BT + tl.arange(0, BT)
        rt = i_m * C + pos
        mt = (pos < C) & (rt < N)
        g = tl.load(g_base + rt[:, None] * stride_gn + rv[None, :] * stride_gd,
                    mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
        if NORMALIZE:
            den = tl.load(den_ptr + i_bh * N + rt, mask=mt, other=1.0)
            delta = tl.load(delta_ptr + i_b * stride_eb + rt * stride_en + i_h * stride_eh,
                            mask=mt, other=0.0)
            dnum = g / den[:, None]
            dden = -delta / den * first_slice
        else:
            dnum = g * scale
            dden = tl.zeros([BT], dtype=tl.float32)
        dq = tl.dot(dnum.to(DT), tl.trans(state.to(DT)), input_precision=PREC)
        dq += dden[:, None] * zsum[None, :]
        if CAUSAL:
            k = tl.load(k_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
                        mask=mt[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
                        mask=mt[:, None] & mv[None, :], other=0.0)
            b = tl.dot(dnum.to(DT), tl.trans(v.to(DT)), input_precision=PREC) + dden[:, None]
            b = tl.where(pos[:, None] >= pos[None, :], b, 0.0)
            dq += w * tl.dot(b.to(DT), k.to(DT), input_precision=PREC)
            state += w * tl.dot(tl.trans(k.to(DT)), v.to(DT), input_precision=PREC)
            zsum += w * tl.sum(k.to(tl.float32), 0)
        tl.store(dq_base + rt[:, None] * stride_pn + rk[None, :] * stride_pd, dq,
                 mask=mt[:, None] & mk[None, :])


@triton.jit
def block_outputs_bwd_kernel_dkv(
    q_ptr, k_ptr, v_ptr, w_ptr, do_ptr, den_ptr, delta_ptr,
    dk_ptr, dv_ptr, dt_ptr, dy_ptr, dw_ptr,
    N, C, H, D, DV, NT, M, scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_wh, stride_wm,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_eb, stride_en, stride_eh,
    stride_part, stride_pb, stride_pn, stride_ph, stride_pd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_tb, stride_th, stride_tm, stride_td, stride_te,
    stride_yb, stride_yh, stride_ym, stride_yd,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dT, dy of one block (and, causal, the intra-block dk partial, dv and dw partial),
    walking its tiles last to first."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < D, rv < DV
    first_slice = (i_v == 0).to(tl.float32)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh
    g_base = do_ptr + i_b * stride_gb + i_h * stride_gh
    dk_base = dk_ptr + i_v * stride_part + i_b * stride_pb + i_h * stride_ph
    dv_base = dv_ptr + i_b * stride_dvb + i_h * stride_dvh
    w = 0.0
    if CAUSAL:
        w = tl.load(w_ptr + i_h * stride_wh + i_m * stride_wm).to(tl.float32)
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    dzsum = tl.zeros([BK], dtype=tl.float32)
    dw = tl.full([], 0.0, tl.float32)
    for jj in range(0, NT):
        j = NT - 1 - jj
        pos = j * BT + tl.arange(0, BT)
        rt = i_m * C + pos
        mt = (pos < C) & (rt < N)
        q = tl.load(q_base + rt[:, None] * stride_qn + rk[None, :] * stride_qd,
                    mask=mt[:, None] & mk[None, :], other=0.0)
        g = tl.load(g_base + rt[:, None] * stride_gn + rv[None, :] * stride_gd,
                    mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32)
        if NORMALIZE:
            den = tl.load(den_ptr + i_bh * N + rt, mask=mt, other=1.0)
            delta = tl.load(delta_ptr + i_b * stride_eb + rt * stride_en + i_h * stride_eh,
                            mask=mt, other=0.0)
            dnum = g / den[:, None]
            dden = -delta / den * first_slice
        else:
            dnum = g * scale
            dden = tl.zeros([BT], dtype=tl.float32)
        if CAUSAL:
            k = tl.load(k_base + rt[:, None] * stride_kn + rk[None, :] * stride_kd,
                        mask=mt[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_base + rt[:, None] * stride_vn + rv[None, :] * stride_vd,
                        mask=mt[:, None] & mv[None, :], other=0.0)
            causal_mask = pos[:, None] >= pos[None, :]
            a = tl.dot(q.to(DT), tl.trans(k.to(DT)), input_precision=PREC)
            a = tl.where(causal_mask, a, 0.0)
            dv = tl.dot(k.to(DT), dstate.to(DT), input_precision=PREC)
            dv += tl.dot(tl.trans(a.to(DT)), dnum.to(DT), input_precision=PREC)
            tl.store(dv_base + rt[:, None] * stride_dvn + rv[None, :] * stride_dvd,
                     (w * dv).to(dv_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])
            b = tl.dot(dnum.to(DT), tl.trans(v.to(DT)), input_precision=PREC) + dden[:, None]
            b = tl.where(causal_mask, b, 0.0)
            x = tl.dot(v.to(DT), tl.trans(dstate.to(DT)), input_precision=PREC)
            x += dzsum[None, :]
            x += tl.dot(tl.trans(b.to(DT)), q.to(DT), input_precision=PREC)
            tl.store(dk_base + rt[:, None] * stride_pn + rk[None, :] * stride_pd, w * x,
                     mask=mt[:, None] & mk[None, :])
            dw += tl.sum(tl.sum(k.to(tl.float32) * x, 1), 0)
        dstate += tl.dot(tl.trans(q.to(DT)), dnum.to(DT), input_precision=PREC)
        dzsum += tl.sum(q.to(tl.float32) * dden[:, None], 0)
    tl.store(dt_ptr + i_b * stride_tb + i_h * stride_th + i_m * stride_tm
             + rk[:, None] * stride_td + rv[None, :] * stride_te, dstate,
             mask=mk[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(dy_ptr + i_b * stride_yb + i_h * stride_yh + i_m * stride_ym + rk * stride_yd,
                 dzsum, mask=mk)
    if CAUSAL:
        # dw partials: [NV, B * H, M], contiguous.
        tl.store(dw_ptr + (i_v * tl.num_programs(1) + i_bh) * M + i_m, dw)
