"""The DiT's own layers: conditioning embedders, 3-D position embedding, the tensor-parallel
GELU MLP and the softmax attention of hybrid (`softmax_layers`) blocks.

Parallel layers follow `mhla_dist.parallel.tp_layers`: heads and MLP columns split over
TP with megatron-core's column/row-parallel linears; tokens split over CP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mhla_dist.parallel import cp_attention
from mhla_dist.parallel.tp_layers import resolve_tp_group

from .patchify import token_positions

# Diffusion time t in [0, 1] is embedded as t * TIME_SCALE, the range DiT's sinusoids were
# designed for (its 1000 discrete steps).
TIME_SCALE = 1000.0
FREQUENCY_EMBEDDING_SIZE = 256


def sinusoidal_embedding(pos: torch.Tensor, dim: int, max_period: float = 10000.0):
    """`[..., dim]` sin/cos features of positions `pos` (`[...]`); `dim` even: cos, then sin
    (DiT's order); odd `dim` gets a zero column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = pos.double()[..., None] * freqs.to(pos.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def sincos_pos_embed_3d(hidden_size: int, patch_grid: Sequence[int],
                        block_grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3-D position embedding `[N, hidden]` in block-major token order.

    Each of the (f, h, w) coordinates gets `2 * (hidden // 6)` sin/cos features; the
    remaining `hidden % 6` columns are zero.
    """
    pos = token_positions(patch_grid, block_grid)  # [N, 3]
    per_axis = 2 * (hidden_size // 6)
    emb = torch.cat([sinusoidal_embedding(pos[:, i], per_axis) for i in range(3)], dim=-1)
    return F.pad(emb, (0, hidden_size - emb.shape[-1])).float()


class TimestepEmbedder(nn.Module):
    """Diffusion time `t` in [0, 1] `[B]` -> `[B, hidden]`: sinusoids, then an MLP."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_embedding(t * TIME_SCALE, FREQUENCY_EMBEDDING_SIZE)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels `[B]` (`num_classes` = the null class) -> `[B, hidden]`."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Checked on the CPU only: on a GPU the check would synchronise every step (and
        # the embedding's own device assert catches it there).
        if not labels.is_cuda and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} "
                             f"= the null class); got {labels.min()}..{labels.max()}")
        return self.table(labels)


class CaptionEmbedder(nn.Module):
    """A pooled caption embedding `[B, caption_dim]` -> `[B, hidden]` (MLP). A dropped
    caption is the zero vector."""

    def __init__(self, caption_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(caption_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.mlp(caption)


def _require_megatron_groups() -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("the DiT needs process groups: pass tp_group=/cp_group= or build "
                           "the topology first (mhla_dist.parallel.build_topology)")


def resolve_cp_group(cp_group=None):
    """`(group, size, rank)`: the given group, or megatron-core's context-parallel group."""
    cp_group = cp_attention.resolve_cp_group(cp_group)
    return cp_group, dist.get_world_size(cp_group), dist.get_rank(cp_group)


def resolve_groups(tp_group=None, cp_group=None):
    """`(tp_group, tp, cp_group, cp, cp_rank)`; None means megatron-core's group."""
    if tp_group is None:
        _require_megatron_groups()
    tp_group, tp = resolve_tp_group(tp_group)
    return (tp_group, tp, *resolve_cp_group(cp_group))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift` with per-sample `[B, hidden]` shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]
