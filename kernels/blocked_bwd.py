"""Hand-written backward of the output stage (`blocked.outputs`), heads-first.

Autograd through the output stage spends most of its time on the score-sized
temporaries of its masks and multiplies; written out, the backward is a handful of
batched matmuls. The math, per sub-chunk, with the weighted keys `k' = w k` (`w` =
`Mc[i, i]`), `X = T_i + R'_j` (`R'_j` the earlier sub-chunks' `sum k' v^T`),
`A = tril(q k'^T)`, `num = q X + A v`, `den = q (y_i + r'_j) + A 1 + eps`, `o = num / den`,
and `g = do`:

    gn = g / den                 gd = -(g . o) / den        (normalised; else gn = scale g)
    dq = gn X^T + gd Y^T + dA k'          with dA = tril(gn v^T + gd 1^T)
    dk' = dA^T q + v dU'^T + dU'_k        dv = A^T gn + k' dU'
    dT_i = sum_j q^T gn          dy_i = sum_j q^T gd
    dU'_j = sum_{j' > j} q_{j'}^T gn_{j'}          (and dU'_k likewise with gd)
    dk = w dk'                   dw = sum over the block's tokens of dk' . k
"""

from __future__ import annotations

import torch

from . import blocked


def _grad_of_quotient(num, den, g, normalize: bool, scale: float):
    """(gn, gd): the gradients that reach the numerator and the denominator."""
    if not normalize:
        return g * scale, None
    gn = g / den
    return gn, -(gn * (num / den)).sum(-1, keepdim=True)


def _reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`out_j = sum_{j' > j} x_j'` along `dim`."""
    total = x.sum(dim, keepdim=True)
    return total - x.cumsum(dim)


def noncausal_outputs_bwd(qb, t, y, g, *, normalize, eps, scale):
    """dq, dt, dy (None without the denominator) of `o = q T [/ (q y + eps)]`, heads-first
    blocks. Unnormalised, nothing token-sized is recomputed (the scale goes onto the
    block-sized `T` and `dT`); normalised, the numerator and denominator are."""
    if not normalize:
        return g @ (t.transpose(-1, -2) * scale), (qb.transpose(-1, -2) @ g).mul_(scale), None
    num = qb @ t
    den = (qb @ y.unsqueeze(-1)).add_(eps)
    gn = g / den
    gd = num.div_(den).mul_(gn).sum(-1, keepdim=True).neg_()  # -(gn . o)
    dq = (gn @ t.transpose(-1, -2)).addcmul_(gd, y.unsqueeze(-2))
    return dq, qb.transpose(-1, -2) @ gn, (qb.transpose(-1, -2) @ gd).squeeze(-1)


def _causal_state(qc, kc, vc, t, y, diag, normalize: bool):
    """The forward's intermediates, recomputed (t, y None: the intra-block terms alone)."""
    kw = blocked.weighted_keys(kc, diag)
    u_kv, u_k = blocked.summaries(kw, vc)
    x = blocked.exclusive_cumsum(u_kv, 3)
    if t is not None:
        x += t.unsqueeze(3)
    st = dict(kw=kw, x=x, a=blocked.bmm(qc, kw.transpose(-1, -2)).tril_())
    if normalize:
        ystate = blocked.exclusive_cumsum(u_k, 3)
        if y is not None:
            ystate += y.unsqueeze(3)
        st["ystate"] = ystate
    return st


def _causal_numden_bwd(qc, kc, vc, diag, st, gn, gd):
    """Gradients from those reaching the numerator (gn) and the denominator (gd, None
    when not normalising): dq, dk, dv, dt, dy (None without gd), ddiag.

    With `k' = w k` (`blocked.weighted_keys`), `A = tril(q k'^T)` and `X = T_i + R'_j`:
    dA = tril(gn v^T + gd 1^T), dq = gn X^T + dA k' (+ gd Y^T), dk' = dA^T q + v dU'^T
    (+ dU'_k), dv = A^T gn + k' dU', with `dU'_j = sum_{j' > j} q^T gn` over the
    sub-chunks; then dk = w dk' and dw = sum over the block of dk' . k.
    """
    kw = st["kw"]
    da = blocked.bmm(gn, vc.transpose(-1, -2))
    if gd is not None:
        da += gd
    da.tril_()
    dq = blocked.bmm_add_(blocked.bmm(gn, st["x"].transpose(-1, -2)), da, kw)
    dkw = blocked.bmm(da.transpose(-1, -2), qc)
    dv = blocked.bmm(st["a"].transpose(-1, -2), gn)
    dx = blocked.bmm(qc.transpose(-1, -2), gn)  # [.., nc, d, dv]
    du_kv = _reverse_exclusive_cumsum(dx, 3)
    blocked.bmm_add_(dkw, vc, du_kv.transpose(-1, -2))
    blocked.bmm_add_(dv, kw, du_kv)
    dy = None
    if gd is not None:
        dq.addcmul_(gd, st["ystate"].unsqueeze(-2))
        dys = (qc * gd).sum(-2)  # [.., nc, d]
        dy = dys.sum(3)
        dkw += _reverse_exclusive_cumsum(dys, 3).unsqueeze(-2)
    ddiag = (dkw * kc).sum((0, 3, 4, 5))  # [H, M]
    if diag.shape[0] == 1:
        ddiag = ddiag.sum(0, keepdim=True)
    return dq, dkw.mul_(blocked.diag_weights(diag, kc.dtype)), dv, dx.sum(3), dy, ddiag


def causal_outputs_bwd(qc, kc, vc, t, y, diag, g, *, normalize, eps, scale):
    """Returns dq, dk, dv `[B, H, M, nc, c, *]`, dt, dy, ddiag (shapes of t, y, diag)."""
    st = _causal_state(qc, kc, vc, t, y, diag, normalize)
    if normalize:
        num = blocked.bmm_add_(blocked.bmm(qc, st["x"]), st["a"], vc)
        den = blocked.bmm(qc, st["ystate"].unsqueeze(-1)).add_(
            st["a"].sum(-1, keepdim=True)).add_(eps)
        gn, gd = _grad_of_quotient(num, den, g, normalize, scale)
    else:
        gn, gd = g * scale, None
    dq, dk, dv, dt, dy, ddiag = _causal_numden_bwd(qc, kc, vc, diag, st, gn, gd)
    return dq, dk, dv, dt, torch.zeros_like(y) if dy is None else dy, ddiag


def causal_intra_bwd(qc, kc, vc, diag, g_num, g_den):
    """Gradients of the intra-block terms (`causal_numden` without t, y): dq, dk, dv
    `[B, H, M, nc, c, *]` and ddiag, given those of the numerator and denominator."""
    st = _causal_state(qc, kc, vc, None, None, diag, g_den is not None)
    dq, dk, dv, _, _, ddiag = _causal_numden_bwd(qc, kc, vc, diag, st, g_num, g_den)
    return dq, dk, dv, ddiag


def outputs_bwd(q, k, v, t, y, diag, do, block_size, *, causal, normalize, eps, scale):
    """Gradients of `blocked.outputs` for the tokens `q, k, v` `[B, n, H, *]`.

    Returns dq, dk, dv as heads-first blocks `[B, H, m, C, *]` (`blocked.write_tokens`
    puts them in place; dk and dv are None when not causal: non-causal tokens reach their
    own k and v only through the summaries), and dt, dy, ddiag (dy None when neither
    causal nor normalised, ddiag None when not causal).
    """
    dtype, m = t.dtype, t.shape[2]
    qb, gb = (blocked.to_blocks(x, block_size, m, dtype) for x in (q, do))
    if not causal:
        dqb, dt, dy = noncausal_outputs_bwd(qb, t, y, gb, normalize=normalize, eps=eps,
                                            scale=scale)
        return dqb, None, None, dt, dy, None
    chunk = blocked.subchunk_size(block_size)
    kb, vb = (blocked.to_blocks(x, block_size, m, dtype) for x in (k, v))
    qc, kc, vc, gc = (blocked.to_subchunks(x, chunk) for x in (qb, kb, vb, gb))
    dq, dk, dv, dt, dy, ddiag = causal_outputs_bwd(qc, kc, vc, t, y, diag, gc,
                                                   normalize=normalize, eps=eps, scale=scale)
    back = [blocked.merge_subchunks(g, block_size) for g in (dq, dk, dv)]
    return (*back, dt, dy, ddiag)
