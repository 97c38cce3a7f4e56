"""Context-parallel MHLA: the token blocks are sharded over the CP group (DESIGN §2).

Rank `r` of `P` holds tokens `[r N/P, (r+1) N/P)`, i.e. whole blocks
`[r M/P, (r+1) M/P)`. Forward: local summaries -> all-gather over CP started -> (causal)
the intra-block terms computed while it is in flight -> mix with this rank's rows of `Mc`
-> local outputs. Backward: the gradient of the gathered summaries is
reduce-scattered back to their owners (the adjoint of the gather). The traffic per rank is
the `M x H x d x (dv + 1)` summaries, independent of `N` for a fixed number of blocks.

What is copied (`start_gather_packed`; tests/parallel/test_cp_copies.py counts it): forward,
the local `S`, `z` once into the send buffer, block-major `[m, B, H, d*dv + d]` so that
the all-gather's dim 0 is the block axis; the received `[M, B, H, d*dv + d]` buffer is not
copied again: `S`, `z` of all blocks are strided views of it, which the mix's GEMMs read in
place. Backward, the mix's gradients of those views are packed once into a buffer of the
same layout, which is reduce-scattered; the local gradients are views of its result.

`Mc` is replicated: each rank's `mixing.grad` holds the rows of its own blocks (and, for
causal, its diagonal entries), so the sum over the CP group -- which the data-parallel
reduction over DP x CP performs -- is the single-device gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mhla_kernels import (
    block_outputs,
    block_outputs_intra,
    block_summaries,
    mhla,
    mix_summaries,
    resolve_backend,
    resolve_layout,
)

from .collectives import start_gather_packed


def resolve_cp_group(group=None):
    """`group`, or megatron-core's context-parallel group when it is None."""
    if group is not None:
        return group
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "context parallelism needs a process group: pass it (group= / cp_group=) or build "
            "the topology first (mhla_dist.parallel.build_topology)"
        )
    return ps.get_context_parallel_group()


def check_cp_shard(local_tokens: int, cp: int, block_size: int, mixing_blocks: int) -> int:
    """Validate a CP shard; returns the number of local blocks."""
    total = local_tokens * cp
    if local_tokens % block_size:
        raise ValueError(
            f"block_size={block_size} does not divide the {local_tokens} tokens each of the "
            f"{cp} context-parallel ranks holds (sequence length {total}); context "
            "parallelism shards whole blocks"
        )
    blocks = total // block_size
    if mixing_blocks < blocks:
        raise ValueError(
            f"mixing is {mixing_blocks}x{mixing_blocks} but the {total}-token sequence has "
            f"{blocks} blocks of {block_size}"
        )
    return local_tokens // block_size


def cp_mhla(
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
    group=None,
    cu_seqlens=None,
) -> torch.Tensor:
    """MHLA over a sequence sharded contiguously across the context-parallel group.

    q, k: `[B, N/P, H, d]`, v: `[B, N/P, H, dv]`: this rank's contiguous shard. Returns the
    matching shard of the single-device `mhla` output; gradients match too (`mixing`'s
    summed over the group). `group` defaults to megatron-core's context-parallel group.
    `cu_seqlens`: packed documents, the **global** offsets over the flattened `B * N`
    tokens (or this rank's `DocumentLayout`); documents may cross rank boundaries.
    """
    group = resolve_cp_group(group)
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    if cu_seqlens is not None:
        return _cp_mhla_documents(q, k, v, mixing, block_size, cu_seqlens, causal=causal,
                                  normalize=normalize, eps=eps, scale=scale, group=group,
                                  cp=cp, rank=rank)
    if cp == 1:
        return mhla(q, k, v, mixing, block_size, causal=causal, normalize=normalize, eps=eps,
                    scale=scale)
    local_blocks = check_cp_shard(q.shape[1], cp, block_size, mixing.shape[-1])
    block_start = rank * local_blocks
    s, z = block_summaries(k, v, block_size)  # [B, m, H, d, dv], [B, m, H, d]
    # One collective for both summaries, block-major: [m, B, H, d*dv + d] packed once.
    pending = start_gather_packed((s, z), 1, group, lead=3)
    intra = None
    if causal and resolve_backend("auto", q, v) == "torch":
        # While the gather is in flight: the causal intra-block terms need no other block.
        # (The Triton backend fuses them into its output kernel, which needs the mix.)
        intra = block_outputs_intra(q, k, v, mixing, block_size, normalize=normalize,
                                    block_start=block_start)
    s_all, z_all = pending.wait()  # [B, M, H, d, dv], [B, M, H, d]: views of the buffer
    t, y = mix_summaries(s_all, z_all, mixing, causal=causal, block_start=block_start,
                         num_rows=local_blocks)
    return block_outputs(q, k, v, t, y, mixing, block_size, causal=causal,
                         normalize=normalize, eps=eps, scale=scale, block_start=block_start,
                         intra=intra)


def _cp_mhla_documents(q, k, v, mixing, block_size, cu_seqlens, *, causal, normalize, eps,
                       scale, group, cp, rank):
    """Packed documents under CP. Every rank lays its segments (what it holds of each
    block of each document) into `S` slots, `S` the most any rank has, and gathers the
    slot summaries: `S * H * d * (dv + 1)` elements per rank, `S <= B * (N/P) / C +
    D + B` with `D` the documents intersecting the rank's shard (counted per row): a
    document's `l` tokens there are at most `l / C + 1` segments, plus one where it
    continues from the previous rank in the middle of a block. A block cut by a rank
    boundary is two segments whose summaries are both in the gather: causal tokens of the
    later one read the earlier one with `Mc[j, j]`, non-causal ones read both."""
    if cp == 1:
        return mhla(q, k, v, mixing, block_size, causal=causal, normalize=normalize, eps=eps,
                    scale=scale, cu_seqlens=cu_seqlens)
    layout = resolve_layout(cu_seqlens, q, mixing, block_size, cp_size=cp, cp_rank=rank)
    qs, ks, vs = (layout.to_slots(x) for x in (q, k, v))
    block_size = layout.slot_size
    s, z = block_summaries(ks, vs, block_size)  # [1, S, H, d, dv], [1, S, H, d]
    pending = start_gather_packed((s, z), 1, group, lead=3)
    diag = layout.mixing_diagonal(mixing, s.dtype)
    intra = None
    if causal and resolve_backend("auto", q, v) == "torch":
        intra = block_outputs_intra(qs, ks, vs, diag, block_size, normalize=normalize)
    s_all, z_all = pending.wait()
    t, y = layout.mix(s_all, z_all, mixing, causal=causal)
    o = block_outputs(qs, ks, vs, t, y, diag, block_size, causal=causal, normalize=normalize,
                      eps=eps, scale=scale, intra=intra)
    return layout.from_slots(o)
