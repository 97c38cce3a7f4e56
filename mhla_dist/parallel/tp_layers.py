"""Tensor-parallel MHLA attention and SwiGLU MLP on megatron-core's parallel linears.

Heads are split over TP (DESIGN §2): q, k, v projections are `ColumnParallelLinear`
(each rank computes its heads), the output projection is a `RowParallelLinear` (partial
sums all-reduced). Tokens may at the same time be split over CP: the attention runs
`cp_mhla` on the local shard. A shared `Mc` is replicated on every TP rank and its
gradient is summed over TP (each rank's heads contribute part of it); a per-head `Mc` is
split by heads like the projections.

Inputs are `[B, N_local, hidden]`; megatron's layers only need the hidden dim last.
Causal layers also decode one token at a time (`prefill`, `step`) on a single CP rank.

Sequence parallelism (`sequence_parallel=True`, TP > 1; Megatron-LM's scheme on our own
device-agnostic collectives, since megatron-core's SP mappings need CUDA): the residual
stream between the regions is this TP rank's `[B, N_local / TP, hidden]` shard. A region
all-gathers the sequence on the way in (its gradient reduce-scattered: each rank's heads
give part of it) and feeds the column-parallel weights directly; the row-parallel output
is reduce-scattered over the sequence instead of all-reduced (its gradient all-gathered).
Decoding (`prefill`, `step`) never shards the sequence.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mhla_kernels import MHLADecodeState, feature_map, mhla, mhla_decode_step

from .collectives import copy_to_group, gather_from_group, reduce_scatter_to_group
from .cp_attention import cp_mhla


def tp_config(tp: int, *, params_dtype: torch.dtype = torch.float32,
              sequence_parallel: bool = False, tp_group=None):
    """megatron-core's `ModelParallelConfig` for `tp` ranks, CPU-initialised weights.

    Weights are initialised on the CPU from the full (master) matrix and then split, so
    a layer's full weights are the same at every TP degree for the same seed.
    """
    from megatron.core import ModelParallelConfig

    if sequence_parallel and not torch.cuda.is_available():
        raise ValueError(
            "sequence_parallel=True needs CUDA: megatron-core's sequence-parallel mappings "
            "allocate on the GPU"
        )
    return ModelParallelConfig(
        tensor_model_parallel_size=tp, use_cpu_initialization=True,
        sequence_parallel=sequence_parallel, params_dtype=params_dtype,
        perform_initialization=True,
    )


def column_linear(proj, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A `ColumnParallelLinear` on `x`; under SP `x` is already the gathered sequence (whose
    gradient the gather's reduce-scatter sums over TP), so the layer's own input region,
    which all-reduces that gradient, is skipped."""
    if not sequence_parallel:
        return proj(x)[0]
    return torch.nn.functional.linear(x, proj.weight, proj.bias)


def row_linear(proj, h: torch.Tensor, sequence_parallel: bool, tp_group) -> torch.Tensor:
    """A `RowParallelLinear` on this rank's partial input `h`: the partial outputs summed
    over TP (all-reduce), or under SP reduce-scattered over the sequence (dim 1), the bias
    then added to the shard (its gradient TP-summed: each rank sees only its tokens)."""
    if not sequence_parallel:
        return proj(h)[0]
    out = reduce_scatter_to_group(torch.nn.functional.linear(h, proj.weight), 1, tp_group)
    return out if proj.bias is None else out + copy_to_group(proj.bias, tp_group).to(out.dtype)


def mark_sequence_parallel(row_proj, sequence_parallel: bool) -> None:
    """Megatron's mark on a row-parallel bias that SP feeds with sequence shards (its
    gradient is TP-summed in `row_linear`)."""
    if sequence_parallel and row_proj.bias is not None:
        row_proj.bias.sequence_parallel = True


def sequence_shard_check(n_local: int, tp: int) -> None:
    if n_local % tp:
        raise ValueError(f"sequence parallelism splits each rank's {n_local} tokens over "
                         f"tp={tp} ranks: {n_local} is not a multiple of {tp}")


def _init_normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def resolve_tp_group(tp_group=None):
    """`(group, size)`: the given group, or megatron-core's tensor-parallel group."""
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    return tp_group, dist.get_world_size(tp_group)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (halves rotated, NeoX style) of `x` `[B, N, H, d]` at
    the token `positions`: `[N]` for every row, or `[B, N]` (per-document positions)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[..., None] * freqs  # [(B,) N, half]
    if angles.dim() == 2:
        angles = angles[None]
    cos = angles.cos().to(x.dtype)[:, :, None, :]
    sin = angles.sin().to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionProjections(nn.Module):
    """The q, k, v (and gate) column-parallel projections, the row-parallel output
    projection, an optional per-head output RMSNorm and rotary embedding: what MHLA and
    softmax attention layers share. Heads split over `tp_group`, tokens over `cp_group`.

    `finish(o, x)`: `o_proj(norm(o) * silu(gate(x)))` (norm and gate when enabled).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, bias: bool = False,
                 output_gate: bool = False, output_norm: bool = False, norm_eps: float = 1e-6,
                 rotary_theta: float | None = None, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp_group, tp = resolve_tp_group(tp_group)
        self.sequence_parallel = sequence_parallel and tp > 1
        if num_heads % tp:
            raise ValueError(f"tp={tp} does not divide the {num_heads} attention heads")
        if rotary_theta is not None and head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.tp, self.tp_group, self.cp_group = tp, tp_group, cp_group
        self.num_heads, self.local_heads, self.head_dim = num_heads, num_heads // tp, head_dim
        self.rotary_theta, self.norm_eps = rotary_theta, norm_eps
        config = tp_config(tp)
        col = dict(config=config, init_method=_init_normal(hidden_size**-0.5), bias=bias,
                   gather_output=False, tp_group=tp_group)
        width = num_heads * head_dim
        self.q_proj = ColumnParallelLinear(hidden_size, width, **col)
        self.k_proj = ColumnParallelLinear(hidden_size, width, **col)
        self.v_proj = ColumnParallelLinear(hidden_size, width, **col)
        self.gate_proj = ColumnParallelLinear(hidden_size, width, **col) if output_gate else None
        self.o_proj = RowParallelLinear(
            width, hidden_size, config=config, init_method=_init_normal(width**-0.5),
            bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        mark_sequence_parallel(self.o_proj, self.sequence_parallel)
        # One weight for every head, replicated over TP (its gradient is TP-summed).
        self.out_norm = nn.Parameter(torch.ones(head_dim)) if output_norm else None

    def cp_rank_size(self) -> tuple[int, int]:
        group = self.cp_group
        if group is None:
            from megatron.core import parallel_state as ps

            if not ps.model_parallel_is_initialized():
                return 0, 1
            group = ps.get_context_parallel_group()
        return dist.get_rank(group), dist.get_world_size(group)

    def positions(self, n_local: int, start: int | None = None, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens (CP shards are contiguous)."""
        if start is None:
            start = self.cp_rank_size()[0] * n_local
        return torch.arange(start, start + n_local, device=device)

    def token_positions(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Rotary positions of the region input `x` `[B, n, hidden]`: the given ones
        (`[B, n]`, e.g. within each document, or `[n]`), or the global ones."""
        b, n = x.shape[:2]
        if positions is None:
            return self.positions(n, device=x.device)
        if tuple(positions.shape) not in ((b, n), (n,)):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected [B, n] = "
                             f"[{b}, {n}] or [n] = [{n}], this rank's tokens")
        return positions.to(x.device, non_blocking=True)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The region's input: under SP the TP-gathered sequence `[B, N_local, hidden]`."""
        if not self.sequence_parallel:
            return x
        return gather_from_group(x, 1, self.tp_group)

    def project(self, x: torch.Tensor, sp: bool = False):
        """q, k, v `[B, N, H_local, d]` of `x` (`sp`: `x` is a gathered region input)."""
        b, n, _ = x.shape
        shape = (b, n, self.local_heads, self.head_dim)
        return tuple(column_linear(proj, x, sp).view(shape)
                     for proj in (self.q_proj, self.k_proj, self.v_proj))

    def maybe_rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.rotary_theta is None else rotate(x, positions, self.rotary_theta)

    def replicated(self, p: torch.Tensor) -> torch.Tensor:
        """A TP-replicated parameter used on this rank's heads only: TP-sum its gradient."""
        return copy_to_group(p, self.tp_group) if self.tp > 1 else p

    def finish(self, o: torch.Tensor, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
        """`sp`: `x` is the gathered region input; the output is reduce-scattered."""
        b, n = o.shape[:2]
        if self.out_norm is not None:
            dtype = torch.promote_types(o.dtype, torch.float32)
            o32 = o.to(dtype)
            o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps)
            o = (o32 * self.replicated(self.out_norm).to(dtype)).to(o.dtype)
        o = o.reshape(b, n, self.local_heads * self.head_dim)
        if self.gate_proj is not None:
            o = o * torch.nn.functional.silu(column_linear(self.gate_proj, x, sp))
        return row_linear(self.o_proj, o, sp, self.tp_group)


def mixing_parameter(mixing_init: torch.Tensor | None, num_heads: int, max_blocks: int,
                     per_head: bool, tp_group) -> nn.Parameter:
    """This TP rank's `Mc` parameter from the full initial one (`[M, M]`, or `[H, M, M]`
    per head; None: identity): shared, replicated over TP; per head, split by heads like
    the column-parallel weights (gathered along dim 0)."""
    full = torch.eye(max_blocks) if mixing_init is None else mixing_init.float()
    if per_head and full.dim() == 2:
        full = full.expand(num_heads, max_blocks, max_blocks)
    expect = (num_heads,) * per_head + (max_blocks, max_blocks)
    if tuple(full.shape) != expect:
        raise ValueError(f"mixing_init has shape {tuple(full.shape)}; expected {expect}")
    tp = dist.get_world_size(tp_group)
    if per_head:
        local = num_heads // tp
        rank = dist.get_rank(tp_group)
        full = full[rank * local:(rank + 1) * local]
    mixing = nn.Parameter(full.clone().contiguous())
    if per_head:
        mixing.tensor_model_parallel, mixing.partition_dim, mixing.partition_stride = True, 0, 1
    return mixing


def nonnegative_mixing(mixing: torch.Tensor) -> torch.Tensor:
    """`max(Mc, 0)` with the gradient passed straight through (see
    `ParallelMHLAttention.effective_mixing`)."""
    return mixing + (mixing.clamp(min=0) - mixing).detach()


class ParallelMHLAttention(AttentionProjections):
    """MHLA self-attention, heads split over `tp_group`, tokens over `cp_group`.

    Args:
        hidden_size, num_heads, head_dim: the projections are `hidden -> H * head_dim`.
        block_size, max_blocks: `Mc` is `[max_blocks, max_blocks]` (shared) or
            `[H, max_blocks, max_blocks]` (per head); shorter sequences use its corner.
        mixing_init: the full initial `Mc` (`[M, M]`, or `[H, M, M]` when per head);
            default identity.
        output_gate, output_norm, rotary_theta: see `AttentionProjections`; the rotary
            embedding is applied after the feature map (so only with normalize=False).
        tp_group, cp_group: process groups (default megatron-core's TP and CP groups).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        block_size: int,
        max_blocks: int,
        causal: bool,
        feature: str = "relu",
        normalize: bool = True,
        per_head_mixing: bool = False,
        mixing_init: torch.Tensor | None = None,
        bias: bool = False,
        output_gate: bool = False,
        output_norm: bool = False,
        norm_eps: float = 1e-6,
        rotary_theta: float | None = None,
        tp_group=None,
        cp_group=None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, bias=bias, output_gate=output_gate,
                         output_norm=output_norm, norm_eps=norm_eps, rotary_theta=rotary_theta,
                         tp_group=tp_group, cp_group=cp_group,
                         sequence_parallel=sequence_parallel)
        if normalize and rotary_theta is not None:
            raise ValueError("a rotary embedding after the feature map makes features signed: "
                             "it needs normalize=False")
        self.block_size, self.causal, self.normalize = block_size, causal, normalize
        self.phi = feature_map(feature, normalize=normalize)
        self.mixing = mixing_parameter(mixing_init, num_heads, max_blocks, per_head_mixing,
                                       self.tp_group)

    def features(self, x: torch.Tensor, positions: torch.Tensor, sp: bool = False):
        q, k, v = self.project(x, sp)
        q, k = (self.maybe_rotate(self.phi(t), positions) for t in (q, k))
        return q, k, v

    def effective_mixing(self) -> torch.Tensor:
        """The `Mc` the operator sees. With `normalize=True` it is `max(Mc, 0)`: a negative
        entry would subtract a block from the denominator `phi(q).y + eps`, which can then
        reach zero (seen after 20 DiT steps). The clamp keeps every weight of `A` >= 0, so
        the output stays a convex combination of values; its gradient passes straight
        through (an entry pushed below zero still feels the gradient at zero and can come
        back, instead of dying). `normalize=False` has no denominator and uses `Mc` as is.
        """
        return nonnegative_mixing(self.mixing) if self.normalize else self.mixing

    def mixing_for_heads(self) -> torch.Tensor:
        mixing = self.effective_mixing()
        return self.replicated(mixing) if self.mixing.dim() == 2 else mixing

    def forward(self, x: torch.Tensor, cu_seqlens=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`cu_seqlens`: packed documents, the global offsets (or this rank's
        `DocumentLayout`); `positions`: `[B, n]` rotary positions (default: global)."""
        x, sp = self.enter(x), self.sequence_parallel
        q, k, v = self.features(x, self.token_positions(x, positions), sp)
        o = cp_mhla(q, k, v, self.mixing_for_heads(), self.block_size, causal=self.causal,
                    normalize=self.normalize, group=self.cp_group, cu_seqlens=cu_seqlens)
        return self.finish(o, x, sp)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor):
        """Causal forward of a whole prompt on one CP rank, and the decode state after it."""
        if not self.causal or self.cp_rank_size()[1] != 1:
            raise ValueError("decoding needs a causal layer and no context parallelism")
        q, k, v = self.features(x, self.positions(x.shape[1], 0, x.device))
        mixing = self.effective_mixing()
        o = mhla(q, k, v, mixing, self.block_size, causal=True, normalize=self.normalize)
        return self.finish(o, x), MHLADecodeState.from_prefill(k, v, mixing, self.block_size)

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: MHLADecodeState) -> torch.Tensor:
        """One token per sequence, `x` `[B, 1, hidden]`, at position `state.position`."""
        q, k, v = self.features(x, self.positions(1, state.position, x.device))
        o = mhla_decode_step(state, q[:, 0], k[:, 0], v[:, 0], self.effective_mixing(),
                             normalize=self.normalize)
        return self.finish(o[:, None].to(v.dtype), x)


class _ParallelMLP(nn.Module):
    """Column-parallel input projections (`inputs` of them) and a row-parallel output."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, inputs: tuple[str, ...],
                 output: str, *, bias: bool, tp_group, sequence_parallel: bool) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp_group, tp = resolve_tp_group(tp_group)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel and tp > 1
        if ffn_hidden_size % tp:
            raise ValueError(f"tp={tp} does not divide ffn_hidden_size={ffn_hidden_size}")
        config = tp_config(tp)
        for name in inputs:
            setattr(self, name, ColumnParallelLinear(
                hidden_size, ffn_hidden_size, config=config, bias=bias, gather_output=False,
                init_method=_init_normal(hidden_size**-0.5), tp_group=tp_group))
        setattr(self, output, RowParallelLinear(
            ffn_hidden_size, hidden_size, config=config, bias=bias, input_is_parallel=True,
            init_method=_init_normal(1 / math.sqrt(ffn_hidden_size)), skip_bias_add=False,
            tp_group=tp_group))
        mark_sequence_parallel(getattr(self, output), self.sequence_parallel)

    def region(self, x: torch.Tensor, sequence_parallel: bool | None):
        """`(input, sp)`: the region's input (gathered under SP) and whether it is."""
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        return (gather_from_group(x, 1, self.tp_group) if sp else x), sp


class ParallelSwiGLU(_ParallelMLP):
    """`down(silu(gate(x)) * up(x))` with gate/up column-parallel and down row-parallel."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, bias: bool = False,
                 tp_group=None, sequence_parallel: bool = False) -> None:
        super().__init__(hidden_size, ffn_hidden_size, ("gate_proj", "up_proj"), "down_proj",
                         bias=bias, tp_group=tp_group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, sequence_parallel: bool | None = None) -> torch.Tensor:
        """`sequence_parallel`: override the layer's setting (decoding never shards)."""
        x, sp = self.region(x, sequence_parallel)
        h = (torch.nn.functional.silu(column_linear(self.gate_proj, x, sp))
             * column_linear(self.up_proj, x, sp))
        return row_linear(self.down_proj, h, sp, self.tp_group)


class ParallelGeluMLP(_ParallelMLP):
    """`fc2(gelu_tanh(fc1(x)))`, fc1 column-parallel, fc2 row-parallel (the DiT's MLP)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, bias: bool = True,
                 tp_group=None, sequence_parallel: bool = False) -> None:
        super().__init__(hidden_size, ffn_hidden_size, ("fc1",), "fc2", bias=bias,
                         tp_group=tp_group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, sequence_parallel: bool | None = None) -> torch.Tensor:
        x, sp = self.region(x, sequence_parallel)
        h = torch.nn.functional.gelu(column_linear(self.fc1, x, sp), approximate="tanh")
        return row_linear(self.fc2, h, sp, self.tp_group)
