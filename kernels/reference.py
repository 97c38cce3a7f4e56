"""The quadratic ground truth of MHLA (DESIGN §1): every fast path is tested against it.

`A[t, s] = Mc[blk(t), blk(s)] * q_t . k_s` (masked to `s <= t` when causal), then
`o = A v / (A 1 + eps)` or `o = scale * A v`. It builds the N x N matrix on purpose:
it is meant to be obviously right, not fast.
"""

from __future__ import annotations

import torch

from .validation import check_shapes


def mhla_reference(
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
    cu_seqlens=None,
) -> torch.Tensor:
    """Quadratic MHLA.

    Args:
        q, k: `[B, N, H, d]`, already passed through the feature map.
        v: `[B, N, H, dv]`.
        mixing: `[M, M]` or `[H, M, M]`, at least `ceil(N / block_size)` blocks.
        cu_seqlens: packed documents (offsets into the flattened `B * N` tokens): every
            document is run alone, one after another (a loop, on purpose).
    Returns:
        `[B, N, H, dv]` in v's dtype (computed in float64 for float64 inputs, else float32).
    """
    if cu_seqlens is not None:
        from .packing import check_cu_seqlens

        b, n = q.shape[:2]
        cu = check_cu_seqlens(cu_seqlens, b * n, n).tolist()
        flat = [x.reshape(1, b * n, *x.shape[2:]) for x in (q, k, v)]
        docs = [mhla_reference(*(x[:, s:e] for x in flat), mixing, block_size, causal=causal,
                               normalize=normalize, eps=eps, scale=scale)
                for s, e in zip(cu[:-1], cu[1:], strict=False)]
        return torch.cat(docs, 1).view(b, n, *v.shape[2:])
    shape = check_shapes(q, k, v, mixing, block_size)
    n, m = shape.tokens, shape.num_blocks
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    mc = mixing[..., :m, :m].to(dtype)
    if mc.dim() == 2:
        mc = mc.unsqueeze(0)  # [1 or H, M, M]
    blk = torch.arange(n, device=q.device) // block_size
    weight = mc[:, blk][:, :, blk]  # [1 or H, N, N]
    a = torch.einsum("bthd,bshd->bhts", qf, kf) * weight
    if causal:
        a = a * torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    num = torch.einsum("bhts,bshe->bthe", a, vf)
    if normalize:
        den = a.sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, N, H, 1]
        out = num / (den + eps)
    else:
        out = num * (shape.head_dim**-0.5 if scale is None else scale)
    return out.to(v.dtype)
