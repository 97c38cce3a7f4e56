"""Single-device MHLA in PyTorch with memory linear in N and small beside the inputs.

Autograd through the blocked form would keep about eight token-sized tensors alive for
the backward (heads-first copies, sub-chunk states, masked scores, numerators): measured
~4x the bytes of q, k, v, o and their gradients at N = 64K. Instead the forward runs over
slabs of whole blocks (`SLAB_TOKENS`), saves only q, k, v, `Mc` and the block-sized
summaries, and the backward (written out in `blocked_bwd.py`) recomputes one slab at a
time. Temporaries are then bounded
by the slab, not the sequence (for blocks up to `SLAB_TOKENS` tokens; a larger block is
its own slab). The cost is a second pass of the output stage.
"""

from __future__ import annotations

import torch

from . import blocked
from .blocked_bwd import outputs_bwd

SLAB_TOKENS = 8192


def slab_ranges(num_blocks: int, block_size: int) -> list[tuple[int, int]]:
    """`[(first_block, stop_block), ...]` covering the blocks, `SLAB_TOKENS` at a time."""
    per_slab = max(1, SLAB_TOKENS // block_size)
    return [(b, min(b + per_slab, num_blocks)) for b in range(0, num_blocks, per_slab)]


def _tokens(b0: int, b1: int, block_size: int, n: int) -> slice:
    return slice(b0 * block_size, min(b1 * block_size, n))


def mhla_fwd(q, k, v, mixing, block_size, num_blocks, causal, normalize, eps, scale):
    """Returns `o` and the summaries the backward needs (`S, z, T, y` heads-first)."""
    n, dtype = q.shape[1], blocked.compute_dtype(q, k, v)
    slabs = slab_ranges(num_blocks, block_size)
    parts = [
        blocked.summaries(*(blocked.to_blocks(x[:, _tokens(b0, b1, block_size, n)],
                                              block_size, b1 - b0, dtype) for x in (k, v)))
        for b0, b1 in slabs
    ]
    s = torch.cat([p[0] for p in parts], dim=2)
    z = torch.cat([p[1] for p in parts], dim=2)
    rows = blocked.mixing_rows(mixing, 0, num_blocks, num_blocks, dtype)
    t, y = blocked.mix(s, z, rows, causal=causal, row_start=0)
    diag = rows.diagonal(dim1=-2, dim2=-1)
    o = v.new_empty(*q.shape[:3], v.shape[-1])
    for b0, b1 in slabs:
        tok = _tokens(b0, b1, block_size, n)
        o[:, tok] = blocked.outputs(
            q[:, tok], k[:, tok], v[:, tok], t[:, :, b0:b1], y[:, :, b0:b1], diag[:, b0:b1],
            block_size, causal=causal, normalize=normalize, eps=eps, scale=scale,
        )
    return o, (s, z, t, y)


def mhla_bwd(do, q, k, v, mixing, s, z, t, y, block_size, causal, normalize, eps, scale,
             need_mixing_grad):
    n, dtype = q.shape[1], t.dtype
    slabs = slab_ranges(t.shape[2], block_size)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dt, dy = torch.empty_like(t), torch.empty_like(y)
    diag = blocked.mixing_diagonal(mixing, 0, t.shape[2], dtype)
    ddiag = torch.zeros_like(diag)
    # 1. The output stage, slab by slab: grads of q, of k and v through the causal
    #    intra-block term, and of the mixed summaries and the diagonal.
    for b0, b1 in slabs:
        tok = _tokens(b0, b1, block_size, n)
        gq, gk, gv, gt, gy, gdiag = outputs_bwd(
            q[:, tok], k[:, tok], v[:, tok], t[:, :, b0:b1], y[:, :, b0:b1], diag[:, b0:b1],
            do[:, tok], block_size, causal=causal, normalize=normalize, eps=eps, scale=scale,
        )
        dq[:, tok], dk[:, tok], dv[:, tok] = gq, gk, gv
        dt[:, :, b0:b1], dy[:, :, b0:b1] = gt, gy
        if causal:
            ddiag[:, b0:b1] = gdiag
    # 2. The mix: dS = Mc^T dT, dz = Mc^T dy, and dMc from T = Mc S (and the diagonal).
    leaves = [s.detach().requires_grad_(), z.detach().requires_grad_(),
              mixing.detach().requires_grad_(need_mixing_grad)]
    with torch.enable_grad():
        rows = blocked.mixing_rows(leaves[2], 0, t.shape[2], t.shape[2], dtype)
        t2, y2 = blocked.mix(leaves[0], leaves[1], rows, causal=causal, row_start=0)
        outs, grads_out = [t2, y2], [dt, dy]
        if causal and need_mixing_grad:
            outs.append(rows.diagonal(dim1=-2, dim2=-1))
            grads_out.append(ddiag)
        grads = torch.autograd.grad(outs, leaves if need_mixing_grad else leaves[:2], grads_out)
    ds, dz = grads[:2]
    dmixing = grads[2] if need_mixing_grad else None
    # 3. The summaries S_b = sum k v^T, z_b = sum k: dk += v dS^T + dz, dv += k dS.
    for b0, b1 in slabs:
        tok = _tokens(b0, b1, block_size, n)
        kb, vb = (blocked.to_blocks(x[:, tok], block_size, b1 - b0, dtype) for x in (k, v))
        gs, gz = ds[:, :, b0:b1], dz[:, :, b0:b1]
        gk = vb @ gs.transpose(-1, -2) + gz.unsqueeze(-2)
        gv = kb @ gs
        dk[:, tok] += blocked.from_blocks(gk, tok.stop - tok.start, dk.dtype)
        dv[:, tok] += blocked.from_blocks(gv, tok.stop - tok.start, dv.dtype)
    return dq, dk, dv, dmixing


class MHLATorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mixing, block_size, num_blocks, causal, normalize, eps, scale):
        o, summaries = mhla_fwd(q, k, v, mixing, block_size, num_blocks, causal, normalize,
                                eps, scale)
        ctx.save_for_backward(q, k, v, mixing, *summaries)
        ctx.args = (block_size, causal, normalize, eps, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mixing, s, z, t, y = ctx.saved_tensors
        dq, dk, dv, dmixing = mhla_bwd(
            do.contiguous(), q, k, v, mixing, s, z, t, y, *ctx.args,
            need_mixing_grad=ctx.needs_input_grad[3],
        )
        return dq, dk, dv, dmixing, None, None, None, None, None, None


def mhla_torch(q, k, v, mixing, block_size, num_blocks, *, causal, normalize, eps, scale):
    return MHLATorchFunction.apply(q, k, v, mixing, block_size, num_blocks, causal, normalize,
                                   eps, scale)
