"""Block products straight on the token-major `[B, N, H, d]` tensors, one head at a time.

When every block is whole (`N % C == 0`), a tensor is contiguous and already in the compute
dtype, `x.view(B*M, C, H, d)[:, :, h]` is a batch of `C x d` matrices with row stride
`H*d`, which BLAS reads in place. (Products are written to a contiguous buffer and copied
into the strided rows: `bmm(..., out=strided)` is 1.7x to 3.5x slower below N = 4K
here.) The heads-first
layout of `blocked.py` instead copies every q, k, v, do in and every gradient out
(measured on this CPU at N = 64K: the `q T` product 17.6 ms strided against 13.6 ms
contiguous plus 7.4 ms of copies; `k^T v` 12.8 ms against 11.4 + 7.4). These products are
the whole of the summaries and of the non-causal outputs, forward and backward; the
causal intra-block terms keep the heads-first sub-chunks. Other inputs (a ragged last
block, bf16 on the CPU backend) take `blocked.py`'s path.

Summaries and mixed summaries stay heads-first (`[B, H, M, d, dv]`, block-sized).
"""

from __future__ import annotations

import torch


def fits(block_size: int, dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    return all(x.shape[1] % block_size == 0 and x.dtype == dtype and x.is_contiguous()
               for x in tensors)


def _heads(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, N, H, d]` -> `[B*M, C, H, d]` (a view); index `[:, :, h]` for one head."""
    b, n, h, d = x.shape
    return x.view(b * (n // block_size), block_size, h, d)


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """Heads-first blocks `[B, H, M, ...]` -> `[H, B*M, ...]` (block-sized: a copy at most)."""
    b, h, m = x.shape[:3]
    return x.transpose(0, 1).reshape(h, b * m, *x.shape[3:])


def _heads_first(x: torch.Tensor, b: int) -> torch.Tensor:
    """`[H, B*M, ...]` -> `[B, H, M, ...]` contiguous (block-sized)."""
    h, bm = x.shape[:2]
    return x.view(h, b, bm // b, *x.shape[2:]).transpose(0, 1).contiguous()


def summaries(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """`S` `[B, H, M, d, dv]`, `z` `[B, H, M, d]` of whole blocks."""
    b, _, h, d = k.shape
    k4, v4 = _heads(k, block_size), _heads(v, block_size)
    s = k.new_empty(h, k4.shape[0], d, v.shape[-1])
    for i in range(h):
        torch.bmm(k4[:, :, i].transpose(1, 2), v4[:, :, i], out=s[i])
    z = k4.sum(1)  # [B*M, H, d]
    return _heads_first(s, b), z.view(b, -1, h, d).transpose(1, 2).contiguous()


def summaries_bwd(k, v, ds, dz, block_size: int):
    """dk = v dS^T + dz, dv = k dS, token-major."""
    k4, v4 = _heads(k, block_size), _heads(v, block_size)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dk4, dv4 = _heads(dk, block_size), _heads(dv, block_size)
    gs, gz = _per_head(ds), _per_head(dz)
    for i in range(k.shape[2]):
        dk4[:, :, i] = torch.baddbmm(gz[i].unsqueeze(1), v4[:, :, i], gs[i].transpose(1, 2))
        dv4[:, :, i] = torch.bmm(k4[:, :, i], gs[i])
    return dk, dv


def _with_denominator(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`[T | y]` per head `[H, B*M, d, dv + 1]`: one product gives numerator and
    denominator together (and, transposed, both halves of `dq`)."""
    return _per_head(torch.cat([t, y.unsqueeze(-1)], dim=-1))


def noncausal_outputs(q, t, y, block_size: int, *, normalize: bool, eps: float, scale: float):
    """`o = q T [/ (q y + eps)]` `[B, N, H, dv]` from heads-first `t`, `y`."""
    q4 = _heads(q, block_size)
    b, n, h, _ = q.shape
    dv = t.shape[-1]
    o = q.new_empty(b, n, h, dv)
    o4 = _heads(o, block_size)
    if not normalize:
        tt = _per_head(t if scale == 1 else t * scale)
        for i in range(h):
            o4[:, :, i] = torch.bmm(q4[:, :, i], tt[i])
        return o
    ty = _with_denominator(t, y)
    for i in range(h):
        nd = torch.bmm(q4[:, :, i], ty[i])
        torch.div(nd[..., :dv], nd[..., dv:].add_(eps), out=o4[:, :, i])
    return o


def noncausal_outputs_bwd(q, t, y, do, block_size: int, *, normalize: bool, eps: float,
                          scale: float):
    """dq (token-major), dt, dy (heads-first; dy None unnormalised) of `noncausal_outputs`;
    `do` in q's dtype and layout."""
    b, _, h, _ = q.shape
    dv = t.shape[-1]
    q4, g4 = _heads(q, block_size), _heads(do, block_size)
    dq = torch.empty_like(q)
    dq4 = _heads(dq, block_size)
    if not normalize:
        tt = _per_head(t if scale == 1 else t * scale)
        dt = t.new_empty(h, q4.shape[0], *t.shape[-2:])
        for i in range(h):
            dq4[:, :, i] = torch.bmm(g4[:, :, i], tt[i].transpose(1, 2))
            torch.bmm(q4[:, :, i].transpose(1, 2), g4[:, :, i], out=dt[i])
        return dq, _heads_first(dt if scale == 1 else dt.mul_(scale), b), None
    ty = _with_denominator(t, y)
    dty = t.new_empty(h, q4.shape[0], t.shape[-2], dv + 1)
    for i in range(h):
        qi = q4[:, :, i]
        nd = torch.bmm(qi, ty[i])
        den = nd[..., dv:].add_(eps)
        o = nd[..., :dv].div_(den)
        # [gn | gd]: the gradients reaching the numerator and the denominator
        gg = torch.empty_like(nd)
        gn = torch.div(g4[:, :, i], den, out=gg[..., :dv])
        torch.sum(o.mul_(gn), -1, keepdim=True, out=gg[..., dv:]).neg_()
        dq4[:, :, i] = torch.bmm(gg, ty[i].transpose(1, 2))
        torch.bmm(qi.transpose(1, 2), gg, out=dty[i])
    dty = _heads_first(dty, b)
    return dq, dty[..., :dv].contiguous(), dty[..., dv]
