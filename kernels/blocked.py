"""Blocked MHLA in PyTorch, on a heads-first layout.

Everything here works on `[B, H, M, C, d]` block views (heads first so every product is
a plain batched matmul on contiguous trailing dims) and accumulates in float32, or in
float64 when an input is float64. Memory stays O(N H d + M H d dv): no N x N matrix, and
for causal blocks larger than `MAX_SINGLE_CHUNK` tokens no C x C matrix either, because
the intra-block term (itself causal linear attention weighted by `Mc[i, i]`) runs over
sub-chunks of `SUBCHUNK` tokens with a running state.

The public, token-major stage functions live in `stages.py`; the single-device operator,
which runs these pieces over slabs of blocks to bound memory, in `torch_function.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUBCHUNK = 64
# Blocks up to this size are one sub-chunk: a C x C tile this small is cheaper than the
# extra state it would take to split it.
MAX_SINGLE_CHUNK = 128


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def to_blocks(
    x: torch.Tensor, block_size: int, num_blocks: int, dtype: torch.dtype
) -> torch.Tensor:
    """`[B, N, H, d]` -> `[B, H, M, C, d]` in `dtype`, zero-padding a ragged last block.

    Zero keys and values contribute nothing (the feature map was applied before), and
    outputs of padded queries are sliced off by the caller.
    """
    x = x.to(dtype).transpose(1, 2)
    pad = num_blocks * block_size - x.shape[2]
    x = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    b, h, _, d = x.shape
    return x.view(b, h, num_blocks, block_size, d)


def from_blocks(o: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, H, M, C, dv]` -> `[B, N, H, dv]` in `dtype`."""
    b, h, m, c, dv = o.shape
    return o.reshape(b, h, m * c, dv)[:, :, :tokens].transpose(1, 2).to(dtype).contiguous()


def write_tokens(out: torch.Tensor, tok: slice, ob: torch.Tensor) -> None:
    """Copy heads-first blocks `ob` `[B, H, m, C, dv]` into the token-major rows
    `out[:, tok]` (`[B, n, H, dv]`) in one pass, converting the dtype on the way (and
    dropping a ragged last block's padding): `from_blocks` then a slice assignment would
    copy the token-sized tensor twice."""
    b, h, m, c, dv = ob.shape
    n = tok.stop - tok.start
    out[:, tok].copy_(ob.reshape(b, h, m * c, dv)[:, :, :n].transpose(1, 2))


def mixing_rows(
    mixing: torch.Tensor, row_start: int, num_rows: int, num_cols: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `[row_start, row_start + num_rows)` and the leading `num_cols` columns of
    `mixing`, as `[1 or H, R, M]`."""
    rows = mixing[..., row_start : row_start + num_rows, :num_cols].to(dtype)
    return rows if rows.dim() == 3 else rows.unsqueeze(0)


def mixing_diagonal(mixing: torch.Tensor, row_start: int, num_rows: int, dtype: torch.dtype):
    """`Mc[i, i]` for the rows `[row_start, row_start + num_rows)`, as `[1 or H, R]`."""
    idx = torch.arange(row_start, row_start + num_rows, device=mixing.device)
    diag = mixing[..., idx, idx].to(dtype)
    return diag if diag.dim() == 2 else diag.unsqueeze(0)


def summaries(kb: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block `S = sum k v^T` `[..., d, dv]` and `z = sum k` `[..., d]` over the token dim."""
    return kb.transpose(-1, -2) @ vb, kb.sum(-2)


def mix(
    s: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, *, causal: bool, row_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`T_i = sum_b Mc[i, b] S_b`, `y_i = sum_b Mc[i, b] z_b` for the given rows.

    s: `[B, H, M, d, dv]`, z: `[B, H, M, d]`, rows: `[1 or H, R, M]` (global rows
    `row_start..`). Causal keeps only `b < i`: the diagonal block is the intra-block term.
    """
    if causal:
        r = torch.arange(rows.shape[1], device=rows.device) + row_start
        col = torch.arange(rows.shape[2], device=rows.device)
        rows = rows * (col[None, :] < r[:, None])
    b, h, m, d, dv = s.shape
    t = (rows.unsqueeze(0) @ s.reshape(b, h, m, d * dv)).view(b, h, -1, d, dv)
    return t, rows.unsqueeze(0) @ z


def subchunk_size(block_size: int) -> int:
    return block_size if block_size <= MAX_SINGLE_CHUNK else SUBCHUNK


def to_subchunks(xb: torch.Tensor, chunk: int) -> torch.Tensor:
    """`[B, H, M, C, d]` -> `[B, H, M, nc, c, d]`, zero-padding each block to a multiple of c."""
    b, h, m, c, d = xb.shape
    pad = -c % chunk
    if pad:
        xb = F.pad(xb, (0, 0, 0, pad))
    return xb.reshape(b, h, m, (c + pad) // chunk, chunk, d)


def noncausal_outputs(qb, t, y, *, normalize: bool, eps: float, scale: float):
    """Block outputs without masking: `o_t = q_t^T T_i [/ (q_t^T y_i + eps)]`. Not for
    autograd (in place; the scale is applied to the block-sized `T`)."""
    if not normalize:
        return qb @ (t * scale)
    return (qb @ t).div_((qb @ y.unsqueeze(-1)).add_(eps))


def weighted_keys(kc: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """`Mc[i, i] k` for the keys of every block `i` (`kc` `[B, H, M, nc, c, d]`, `diag`
    `[1 or H, M]`). The intra-block term is causal linear attention on these keys: the
    earlier sub-chunks' state and the masked scores then carry the weight once, with no
    multiply on any score-sized tensor."""
    return kc * diag_weights(diag, kc.dtype)


def diag_weights(diag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`Mc[i, i]` `[1 or H, M]` shaped to broadcast over sub-chunk blocks `[B, H, M, nc, c, d]`."""
    return diag.reshape(1, diag.shape[0], diag.shape[1], 1, 1, 1).to(dtype)


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`out_j = sum_{j' < j} x_j'` along `dim`."""
    return x.cumsum(dim).sub_(x)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` over any leading dims, as one `bmm` (`a`, `b` broadcast-free)."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-1], b.shape[-1])


def bmm_add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`out += a @ b` in place over any leading dims (`out` contiguous)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                           b.reshape(-1, *b.shape[-2:]))
    return out


def causal_numden(qc, kc, vc, diag, t=None, y=None, *, normalize: bool):
    """Numerator `[B, H, M, nc, c, dv]` and denominator (before eps; None when not
    normalising) `[B, H, M, nc, c, 1]` of causal block outputs over sub-chunks.

    qc, kc, vc: `[B, H, M, nc, c, *]`; diag: `Mc[i, i]` as `[1 or H, M]`; t, y: the
    strictly-lower mix `[B, H, M, d, dv]`, `[B, H, M, d]`, or None for the intra-block
    terms alone (what context parallelism computes while the summaries are still being
    gathered). Token `t` in sub-chunk `j` of block `i` sees the mixed prefix `T_i`, plus
    `Mc[i, i]` times the earlier sub-chunks' state and its own sub-chunk's masked scores:
    with `k' = Mc[i, i] k` (`weighted_keys`), `q (T_i + sum_{j' < j} k'^T v) + tril(q k'^T) v`.
    """
    kw = weighted_keys(kc, diag)
    u_kv, u_k = summaries(kw, vc)
    state = exclusive_cumsum(u_kv, 3)
    if t is not None:
        state += t.unsqueeze(3)
    scores = bmm(qc, kw.transpose(-1, -2)).tril_()
    num = bmm_add_(bmm(qc, state), scores, vc)
    if not normalize:
        return num, None
    state_k = exclusive_cumsum(u_k, 3)
    if y is not None:
        state_k += y.unsqueeze(3)
    return num, bmm(qc, state_k.unsqueeze(-1)).add_(scores.sum(-1, keepdim=True))


def causal_outputs(qc, kc, vc, t, y, diag, *, normalize: bool, eps: float, scale: float):
    """Causal block outputs `[B, H, M, nc, c, dv]` (see `causal_numden`)."""
    num, den = causal_numden(qc, kc, vc, diag, t, y, normalize=normalize)
    return num.mul_(scale) if not normalize else num.div_(den.add_(eps))


def merge_subchunks(o: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, H, M, nc, c, dv]` -> `[B, H, M, C, dv]`, dropping the sub-chunk padding."""
    b, h, m, nc, c, dv = o.shape
    return o.reshape(b, h, m, nc * c, dv)[:, :, :, :block_size]


def outputs(q, k, v, t, y, diag, block_size, *, causal, normalize, eps, scale):
    """Outputs of the tokens `q, k, v` `[B, n, H, *]` (whole blocks but a ragged last one)
    from their blocks' mixed summaries `t` `[B, H, m, d, dv]`, `y` `[B, H, m, d]` and, when
    causal, `diag` = `Mc[i, i]` `[1 or H, m]`. Returns heads-first blocks
    `[B, H, m, C, dv]` (`write_tokens` puts them in place); non-causal reads no k or v."""
    dtype = t.dtype
    m = t.shape[2]
    qb = to_blocks(q, block_size, m, dtype)
    if not causal:
        return noncausal_outputs(qb, t, y, normalize=normalize, eps=eps, scale=scale)
    kb, vb = (to_blocks(x, block_size, m, dtype) for x in (k, v))
    chunk = subchunk_size(block_size)
    qc, kc, vc = (to_subchunks(x, chunk) for x in (qb, kb, vb))
    o = causal_outputs(qc, kc, vc, t, y, diag, normalize=normalize, eps=eps, scale=scale)
    return merge_subchunks(o, block_size)
