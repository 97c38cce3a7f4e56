"""Hand-written backward of the output stage (`blocked.outputs`), heads-first.

Autograd through the output stage spends most of its time on the gradient of the
broadcast `Mc[i, i]` multiplies and on flip-cumsum-flip for the exclusive prefix sums;
written out, the backward is a handful of batched matmuls. The math, per sub-chunk with
`X = T_i + w R_j` (`R_j` the earlier sub-chunks' `sum k v^T`), `A = w tril(q k^T)`,
`num = q X + A v`, `den = q (y_i + w r_j) + A 1 + eps`, `o = num / den`, and `g = do`:

    gn = g / den                 gd = -(g . o) / den        (normalised; else gn = scale g)
    dq = gn X^T + gd Y^T + (w * mask * dA) k      with dA = gn v^T + gd 1^T
    dk = (w * mask * dA)^T q + v dU^T + dU_k      dv = A^T gn + k dU
    dT_i = sum_j q^T gn          dy_i = sum_j q^T gd
    dU_j = w sum_{j' > j} q_{j'}^T gn_{j'}         (and dU_k likewise with gd)
    dw = <dX, R> + <dY, r> + <dA, tril(q k^T)>
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _causal_state(qc, kc, vc, t, y, diag):
    """The forward's intermediates, recomputed (t, y None: the intra-block terms alone)."""
    c = qc.shape[-2]
    w6 = diag.reshape(1, diag.shape[0], diag.shape[1], 1, 1, 1)
    u_kv, u_k = blocked.summaries(kc, vc)
    prev_kv = F.pad(u_kv.cumsum(3)[:, :, :, :-1], (0, 0, 0, 0, 1, 0))
    prev_k = F.pad(u_k.cumsum(3)[:, :, :, :-1], (0, 0, 1, 0))
    x, ystate = w6 * prev_kv, w6[..., 0] * prev_k
    if t is not None:
        x, ystate = t.unsqueeze(3) + x, y.unsqueeze(3) + ystate
    mask = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    pm = (qc @ kc.transpose(-1, -2)) * mask
    return dict(w6=w6, prev_kv=prev_kv, prev_k=prev_k, x=x, ystate=ystate, mask=mask, pm=pm,
                a=pm * w6)


def _causal_numden_bwd(qc, kc, vc, st, gn, gd, diag_heads):
    """Gradients from those reaching the numerator (gn) and the denominator (gd, None
    when not normalising): dq, dk, dv, dt, dy (None without gd), ddiag."""
    w6 = st["w6"]
    da = gn @ vc.transpose(-1, -2)
    if gd is not None:
        da = da + gd
    da_w = da * st["mask"] * w6
    dq = gn @ st["x"].transpose(-1, -2) + da_w @ kc
    dk = da_w.transpose(-1, -2) @ qc
    dv = st["a"].transpose(-1, -2) @ gn
    dx = qc.transpose(-1, -2) @ gn  # [.., nc, d, dv]
    du_kv = _reverse_exclusive_cumsum(w6 * dx, 3)
    dk = dk + vc @ du_kv.transpose(-1, -2)
    dv = dv + kc @ du_kv
    ddiag_full = (dx * st["prev_kv"]).sum((-1, -2)) + (da * st["pm"]).sum((-1, -2))
    dy = None
    if gd is not None:
        dq = dq + gd * st["ystate"].unsqueeze(-2)
        dys = (qc * gd).sum(-2)  # [.., nc, d]
        dy = dys.sum(3)
        dk = dk + _reverse_exclusive_cumsum(w6[..., 0] * dys, 3).unsqueeze(-2)
        ddiag_full = ddiag_full + (dys * st["prev_k"]).sum(-1)
    ddiag = ddiag_full.sum((0, 3))  # [H, M]
    if diag_heads == 1:
        ddiag = ddiag.sum(0, keepdim=True)
    return dq, dk, dv, dx.sum(3), dy, ddiag


def causal_outputs_bwd(qc, kc, vc, t, y, diag, g, *, normalize, eps, scale):
    """Returns dq, dk, dv `[B, H, M, nc, c, *]`, dt, dy, ddiag (shapes of t, y, diag)."""
    st = _causal_state(qc, kc, vc, t, y, diag)
    num = qc @ st["x"] + st["a"] @ vc
    den = (qc @ st["ystate"].unsqueeze(-1) + st["a"].sum(-1, keepdim=True) + eps
           if normalize else None)
    gn, gd = _grad_of_quotient(num, den, g, normalize, scale)
    dq, dk, dv, dt, dy, ddiag = _causal_numden_bwd(qc, kc, vc, st, gn, gd, diag.shape[0])
    return dq, dk, dv, dt, torch.zeros_like(y) if dy is None else dy, ddiag


def causal_intra_bwd(qc, kc, vc, diag, g_num, g_den):
    """Gradients of the intra-block terms (`causal_numden` without t, y): dq, dk, dv
    `[B, H, M, nc, c, *]` and ddiag, given those of the numerator and denominator."""
    st = _causal_state(qc, kc, vc, None, None, diag)
    dq, dk, dv, _, _, ddiag = _causal_numden_bwd(qc, kc, vc, st, g_num, g_den, diag.shape[0])
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
