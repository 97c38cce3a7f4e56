"""The torch backend's autograd: the two token-sized stages as `autograd.Function`s.

Autograd through the blocked form would keep about eight token-sized tensors alive for
the backward (heads-first copies, sub-chunk states, masked scores, numerators): measured
~4x the bytes of q, k, v, o and their gradients at N = 64K. Instead each stage runs over
slabs of whole blocks (`SLAB_TOKENS`), saves only its token-major inputs and block-sized
summaries, and its backward (written out in `blocked_bwd.py`) recomputes one slab at a
time. Temporaries are bounded by the slab, not the sequence (single-device `mhla` splits a
block larger than a slab into virtual blocks; the stage functions keep such a block as
one slab). The mix between the stages is a small GEMM left to autograd.

`mhla_torch` composes them for one device; `stages.py` exposes them to context
parallelism, which inserts an all-gather of the summaries between the two.
"""

from __future__ import annotations

import torch

from . import blocked, token_major
from .blocked_bwd import causal_intra_bwd, outputs_bwd

SLAB_TOKENS = 8192


def slab_ranges(num_blocks: int, block_size: int) -> list[tuple[int, int]]:
    """`[(first_block, stop_block), ...]` covering the blocks, `SLAB_TOKENS` at a time."""
    per_slab = max(1, SLAB_TOKENS // block_size)
    return [(b, min(b + per_slab, num_blocks)) for b in range(0, num_blocks, per_slab)]


def _slabs(num_blocks: int, block_size: int, tokens: int):
    """`(b0, b1, token_slice)` for every slab."""
    for b0, b1 in slab_ranges(num_blocks, block_size):
        yield b0, b1, slice(b0 * block_size, min(b1 * block_size, tokens))


class BlockSummaries(torch.autograd.Function):
    """k `[B, N, H, d]`, v -> S `[B, H, M, d, dv]`, z `[B, H, M, d]` (compute dtype)."""

    @staticmethod
    def forward(ctx, k, v, block_size, num_blocks, dtype):
        ctx.save_for_backward(k, v)
        ctx.args = (block_size, num_blocks, dtype)
        if token_major.fits(block_size, dtype, k, v):
            return token_major.summaries(k, v, block_size)
        parts = [
            blocked.summaries(*(blocked.to_blocks(x[:, tok], block_size, b1 - b0, dtype)
                                for x in (k, v)))
            for b0, b1, tok in _slabs(num_blocks, block_size, k.shape[1])
        ]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    @staticmethod
    def backward(ctx, ds, dz):
        # S_b = sum k v^T, z_b = sum k: dk = v dS^T + dz, dv = k dS.
        k, v = ctx.saved_tensors
        block_size, num_blocks, dtype = ctx.args
        if token_major.fits(block_size, dtype, k, v):
            return (*token_major.summaries_bwd(k, v, ds, dz, block_size), None, None, None)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for b0, b1, tok in _slabs(num_blocks, block_size, k.shape[1]):
            kb, vb = (blocked.to_blocks(x[:, tok], block_size, b1 - b0, dtype) for x in (k, v))
            gs, gz = ds[:, :, b0:b1], dz[:, :, b0:b1]
            blocked.write_tokens(dk, tok, (vb @ gs.transpose(-1, -2)).add_(gz.unsqueeze(-2)))
            blocked.write_tokens(dv, tok, kb @ gs)
        return dk, dv, None, None, None


class BlockOutputs(torch.autograd.Function):
    """Outputs `[B, N, H, dv]` of q, k, v from the mixed `t`, `y` (heads-first) and, when
    causal, the diagonal `Mc[i, i]` `[1 or H, M]` (pass an empty tensor otherwise).

    Non-causal outputs read k and v only through the summaries: they are neither saved
    nor given a gradient here (no conversion, no zero gradients to add), and whole blocks
    in the compute dtype take the copy-free per-head products of `token_major.py`."""

    @staticmethod
    def forward(ctx, q, k, v, t, y, diag, block_size, causal, normalize, eps, scale):
        ctx.args = (block_size, causal, normalize, eps, scale)
        if causal:
            ctx.save_for_backward(q, k, v, t, y, diag)
        else:
            ctx.save_for_backward(q, t, y)
            if token_major.fits(block_size, t.dtype, q, v):
                return token_major.noncausal_outputs(q, t, y, block_size, normalize=normalize,
                                                     eps=eps, scale=scale)
        o = v.new_empty(*q.shape[:3], v.shape[-1])
        for b0, b1, tok in _slabs(t.shape[2], block_size, q.shape[1]):
            blocked.write_tokens(o, tok, blocked.outputs(
                q[:, tok], k[:, tok], v[:, tok], t[:, :, b0:b1], y[:, :, b0:b1],
                diag[:, b0:b1] if causal else None, block_size,
                causal=causal, normalize=normalize, eps=eps, scale=scale,
            ))
        return o

    @staticmethod
    def backward(ctx, do):
        block_size, causal, normalize, eps, scale = ctx.args
        do = do.contiguous()
        if causal:
            q, k, v, t, y, diag = ctx.saved_tensors
        else:
            (q, t, y), k, v, diag = ctx.saved_tensors, None, None, None
            if token_major.fits(block_size, t.dtype, q, do):
                dq, dt, dy = token_major.noncausal_outputs_bwd(
                    q, t, y, do, block_size, normalize=normalize, eps=eps, scale=scale)
                return dq, None, None, dt, dy, None, None, None, None, None, None
        dq = torch.empty_like(q)
        dk, dv = (torch.empty_like(k), torch.empty_like(v)) if causal else (None, None)
        dt = torch.empty_like(t)
        dy = torch.empty_like(y) if causal or normalize else None
        ddiag = torch.zeros_like(diag) if causal else None
        for b0, b1, tok in _slabs(t.shape[2], block_size, q.shape[1]):
            gq, gk, gv, gt, gy, gdiag = outputs_bwd(
                q[:, tok], None if k is None else k[:, tok], None if v is None else v[:, tok],
                t[:, :, b0:b1], y[:, :, b0:b1], diag[:, b0:b1] if causal else None,
                do[:, tok], block_size, causal=causal, normalize=normalize, eps=eps,
                scale=scale,
            )
            for out, g in ((dq, gq), (dk, gk), (dv, gv)):
                if out is not None:
                    blocked.write_tokens(out, tok, g)
            dt[:, :, b0:b1] = gt
            if dy is not None:
                dy[:, :, b0:b1] = gy
            if causal:
                ddiag[:, b0:b1] = gdiag
        return dq, dk, dv, dt, dy, ddiag, None, None, None, None, None


class BlockIntra(torch.autograd.Function):
    """The causal intra-block terms alone: numerator `[B, H, M, C, dv]` and denominator
    (before eps) `[B, H, M, C, 1]`, heads-first blocks (padded), from q, k, v and
    `diag = Mc[i, i]` `[1 or H, M]`. Context parallelism computes them while the
    summaries are gathered; `combine_outputs` adds the mixed prefix afterwards."""

    @staticmethod
    def forward(ctx, q, k, v, diag, block_size, normalize, dtype):
        m = diag.shape[1]
        b, _, h, _ = q.shape
        num = q.new_empty(b, h, m, block_size, v.shape[-1], dtype=dtype)
        den = q.new_empty(b, h, m, block_size, 1, dtype=dtype) if normalize else None
        chunk = blocked.subchunk_size(block_size)
        for b0, b1, tok in _slabs(m, block_size, q.shape[1]):
            qc, kc, vc = (blocked.to_subchunks(blocked.to_blocks(x[:, tok], block_size,
                                                                 b1 - b0, dtype), chunk)
                          for x in (q, k, v))
            n_s, d_s = blocked.causal_numden(qc, kc, vc, diag[:, b0:b1], normalize=normalize)
            num[:, :, b0:b1] = blocked.merge_subchunks(n_s, block_size)
            if normalize:
                den[:, :, b0:b1] = blocked.merge_subchunks(d_s, block_size)
        ctx.save_for_backward(q, k, v, diag)
        ctx.args = (block_size, normalize, dtype)
        return (num, den) if normalize else (num,)

    @staticmethod
    def backward(ctx, g_num, g_den=None):
        q, k, v, diag = ctx.saved_tensors
        block_size, normalize, dtype = ctx.args
        chunk = blocked.subchunk_size(block_size)
        dq, dk, dv, ddiag = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                             torch.empty_like(diag))
        for b0, b1, tok in _slabs(diag.shape[1], block_size, q.shape[1]):
            qc, kc, vc = (blocked.to_subchunks(blocked.to_blocks(x[:, tok], block_size,
                                                                 b1 - b0, dtype), chunk)
                          for x in (q, k, v))
            gn = blocked.to_subchunks(g_num[:, :, b0:b1], chunk)
            gd = blocked.to_subchunks(g_den[:, :, b0:b1], chunk) if normalize else None
            gq, gk, gv, ddiag[:, b0:b1] = causal_intra_bwd(qc, kc, vc, diag[:, b0:b1], gn, gd)
            for out, g in ((dq, gq), (dk, gk), (dv, gv)):
                blocked.write_tokens(out, tok, blocked.merge_subchunks(g, block_size))
        return dq, dk, dv, ddiag, None, None, None


def combine_outputs(q, t, y, intra, block_size, *, normalize, eps, scale, out_dtype):
    """Outputs from the intra-block terms (`BlockIntra`) and the mixed prefix t, y
    (heads-first): `(num + q T) / (den + q y + eps)`. Plain autograd: block-sized."""
    qb = blocked.to_blocks(q, block_size, t.shape[2], t.dtype)
    num = intra[0] + qb @ t
    o = num * scale if not normalize else num / (intra[1] + qb @ y.unsqueeze(-1) + eps)
    return blocked.from_blocks(o, q.shape[1], out_dtype)


def block_outputs_hf(q, k, v, t, y, diag, block_size, *, causal, normalize, eps, scale):
    """`BlockOutputs.apply` with `diag` optional (None when not causal)."""
    if diag is None:
        diag = t.new_zeros(1, t.shape[2])
    return BlockOutputs.apply(q, k, v, t, y, diag, block_size, causal, normalize, eps, scale)


def virtual_block_size(block_size: int) -> int:
    """The largest divisor of `block_size` that fits a slab (and is at least a sub-chunk),
    or `block_size` itself when it fits or has no such divisor."""
    if block_size <= SLAB_TOKENS:
        return block_size
    for size in range(SLAB_TOKENS, blocked.SUBCHUNK - 1, -1):
        if block_size % size == 0:
            return size
    return block_size


def split_blocks(mixing: torch.Tensor, num_blocks: int, parts: int) -> torch.Tensor:
    """`Mc` for blocks split into `parts` virtual blocks each: `Mc kron ones(parts, parts)`.

    Within a real block `i` every virtual block reads the earlier ones (and itself) with
    `Mc[i, i]`, which is the causal intra-block term; across blocks `Mc[i, j]` as before;
    non-causal, each virtual block mixes the whole of every block. So MHLA over the
    virtual blocks equals MHLA over the real ones, and autograd sums `dMc` back.
    """
    mc = mixing[..., :num_blocks, :num_blocks]
    return mc.repeat_interleave(parts, dim=-1).repeat_interleave(parts, dim=-2)


def mhla_torch(q, k, v, mixing, block_size, num_blocks, *, causal, normalize, eps, scale):
    """Single-device MHLA: summaries -> mix (all rows) -> outputs.

    Blocks larger than a slab are split into virtual blocks (`split_blocks`), so the
    memory bound of the slabs holds for any block size.
    """
    virtual = virtual_block_size(block_size)
    if virtual != block_size:
        mixing = split_blocks(mixing, num_blocks, block_size // virtual)
        block_size, num_blocks = virtual, -(-q.shape[1] // virtual)
    dtype = blocked.compute_dtype(q, k, v)
    s, z = BlockSummaries.apply(k, v, block_size, num_blocks, dtype)
    rows = blocked.mixing_rows(mixing, 0, num_blocks, num_blocks, dtype)
    if not normalize and not causal:
        # The scale of the unnormalised output goes onto the M x M mix instead of onto a
        # block-sized T in the forward and again in the backward.
        rows, scale = rows * scale, 1.0
    t, y = blocked.mix(s, z, rows, causal=causal, row_start=0)
    diag = rows.diagonal(dim1=-2, dim2=-1) if causal else None
    return block_outputs_hf(q, k, v, t, y, diag, block_size, causal=causal,
                            normalize=normalize, eps=eps, scale=scale)
