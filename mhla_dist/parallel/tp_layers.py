"""Tensor-parallel MHLA attention and SwiGLU MLP on megatron-core's parallel linears.

Heads are split over TP (DESIGN §2): q, k, v projections are `ColumnParallelLinear`
(each rank computes its heads), the output projection is a `RowParallelLinear` (partial
sums all-reduced). Tokens may at the same time be split over CP: the attention runs
`cp_mhla` on the local shard. A shared `Mc` is replicated on every TP rank and its
gradient is summed over TP (each rank's heads contribute part of it); a per-head `Mc` is
split by heads like the projections.

Inputs are `[B, N_local, hidden]`; megatron's layers only need the hidden dim last.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mhla_kernels import feature_map

from .collectives import copy_to_group
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


def _init_normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def resolve_tp_group(tp_group=None):
    """`(group, size)`: the given group, or megatron-core's tensor-parallel group."""
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    return tp_group, dist.get_world_size(tp_group)


class ParallelMHLAttention(nn.Module):
    """MHLA self-attention, heads split over `tp_group`, tokens over `cp_group`.

    Args:
        hidden_size, num_heads, head_dim: the projections are `hidden -> H * head_dim`.
        block_size, max_blocks: `Mc` is `[max_blocks, max_blocks]` (shared) or
            `[H, max_blocks, max_blocks]` (per head); shorter sequences use its corner.
        mixing_init: the full initial `Mc` (`[M, M]`, or `[H, M, M]` when per head);
            default identity.
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
        tp_group=None,
        cp_group=None,
    ) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp_group, tp = resolve_tp_group(tp_group)
        if num_heads % tp:
            raise ValueError(f"tp={tp} does not divide the {num_heads} attention heads")
        self.tp, self.tp_group, self.cp_group = tp, tp_group, cp_group
        self.num_heads, self.local_heads, self.head_dim = num_heads, num_heads // tp, head_dim
        self.block_size, self.causal, self.normalize = block_size, causal, normalize
        self.phi = feature_map(feature, normalize=normalize)
        config = tp_config(tp)
        init = _init_normal(hidden_size**-0.5)
        col = dict(config=config, init_method=init, bias=bias, gather_output=False,
                   tp_group=tp_group)
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, **col)
        self.k_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, **col)
        self.v_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, **col)
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, config=config,
            init_method=_init_normal((num_heads * head_dim) ** -0.5), bias=bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        full = torch.eye(max_blocks) if mixing_init is None else mixing_init.float()
        if per_head_mixing and full.dim() == 2:
            full = full.expand(num_heads, max_blocks, max_blocks)
        expect = (num_heads,) * per_head_mixing + (max_blocks, max_blocks)
        if tuple(full.shape) != expect:
            raise ValueError(f"mixing_init has shape {tuple(full.shape)}; expected {expect}")
        if per_head_mixing:
            rank = dist.get_rank(tp_group)
            full = full[rank * self.local_heads:(rank + 1) * self.local_heads]
        self.mixing = nn.Parameter(full.clone().contiguous())
        if per_head_mixing:
            # Split by heads like the column-parallel weights: gathered along dim 0.
            self.mixing.tensor_model_parallel, self.mixing.partition_dim = True, 0
            self.mixing.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        shape = (b, n, self.local_heads, self.head_dim)
        q = self.phi(self.q_proj(x)[0].view(shape))
        k = self.phi(self.k_proj(x)[0].view(shape))
        v = self.v_proj(x)[0].view(shape)
        mixing = self.mixing
        if mixing.dim() == 2 and self.tp > 1:
            mixing = copy_to_group(mixing, self.tp_group)
        o = cp_mhla(q, k, v, mixing, self.block_size, causal=self.causal,
                    normalize=self.normalize, group=self.cp_group)
        return self.o_proj(o.reshape(b, n, self.local_heads * self.head_dim))[0]


class ParallelSwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate/up column-parallel and down row-parallel."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, bias: bool = False,
                 tp_group=None) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp_group, tp = resolve_tp_group(tp_group)
        if ffn_hidden_size % tp:
            raise ValueError(f"tp={tp} does not divide ffn_hidden_size={ffn_hidden_size}")
        config = tp_config(tp)
        col = dict(config=config, init_method=_init_normal(hidden_size**-0.5), bias=bias,
                   gather_output=False, tp_group=tp_group)
        self.gate_proj = ColumnParallelLinear(hidden_size, ffn_hidden_size, **col)
        self.up_proj = ColumnParallelLinear(hidden_size, ffn_hidden_size, **col)
        self.down_proj = RowParallelLinear(
            ffn_hidden_size, hidden_size, config=config,
            init_method=_init_normal(1 / math.sqrt(ffn_hidden_size)), bias=bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0]
        return self.down_proj(h)[0]
