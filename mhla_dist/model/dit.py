"""The MHLA video diffusion transformer (non-causal DiT with adaLN-Zero).

    clip [B, C, F, H, W] --patchify (block-major)--> this CP rank's tokens [B, N/cp, p]
      -> linear patch embedding + 3-D position embedding
      -> depth x DiTBlock(x, c[, text]), c = time + class (+ pooled caption) embedding,
         text = caption tokens (cross-attention, models with `text_dim`)
      -> final adaLN + linear -> velocity tokens [B, N/cp, p]       (p = C * pt * ph * pw)

Every rank of a data-parallel replica gets the same clip, time and label; each
context-parallel rank keeps its contiguous slice of the block-major tokens, i.e. whole
MHLA blocks (spatio-temporal tiles), and the attention runs `cp_mhla` (or, for the
`softmax_layers`, SDPA over all-gathered K and V). Heads and MLP columns are split over
tensor-parallel ranks by megatron-core's parallel linears; everything else (embedders,
norms, adaLN modulation, `Mc`) is replicated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mhla_dist.config.dit import DiTConfig
from mhla_dist.parallel.collectives import copy_to_group, gather_for_replicated, split_to_group
from mhla_dist.parallel.softmax_attention import ParallelSoftmaxAttention
from mhla_dist.parallel.tp_layers import (
    ParallelGeluMLP,
    ParallelMHLAttention,
    sequence_shard_check,
)
from mhla_kernels import block_grid_mixing

from .dit_cost import dit_flops_per_sample, dit_num_parameters
from .dit_layers import modulate, sincos_pos_embed_3d
from .video_base import VideoTransformer
from .wan_layers import CrossAttention, layer_norm32

__all__ = ["DiT", "DiTBlock", "FinalLayer", "dit_flops_per_sample", "dit_num_parameters"]


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: the conditioning `c` gives shift, scale and gate for
    the attention and the MLP; the modulation starts at zero, so a fresh block is the
    identity."""

    def __init__(self, cfg: DiTConfig, layer: int, *, mixing_init: torch.Tensor,
                 tp_group, cp_group, sequence_parallel: bool = False) -> None:
        super().__init__()
        h, sp = cfg.hidden_size, sequence_parallel
        self.tp_group, self.sequence_parallel = tp_group, sp
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.softmax = layer in cfg.softmax_layers
        if self.softmax:
            self.attn = ParallelSoftmaxAttention(h, cfg.num_heads, cfg.head_dim, causal=False,
                                                 bias=cfg.bias, tp_group=tp_group,
                                                 cp_group=cp_group, sequence_parallel=sp)
        else:
            self.attn = ParallelMHLAttention(
                h, cfg.num_heads, cfg.head_dim, block_size=cfg.block_size,
                max_blocks=cfg.num_blocks, causal=False, feature=cfg.feature_map,
                normalize=True, per_head_mixing=cfg.per_head_mixing, mixing_init=mixing_init,
                bias=cfg.bias, tp_group=tp_group, cp_group=cp_group, sequence_parallel=sp)
        if cfg.text_dim:  # caption tokens: ungated cross-attention, as Wan2.1 and PixArt
            self.norm_cross = nn.LayerNorm(h, eps=cfg.norm_eps)
            self.cross_attn = CrossAttention(h, cfg.num_heads, eps=cfg.norm_eps,
                                             tp_group=tp_group, sequence_parallel=sp)
        self.mlp = ParallelGeluMLP(h, cfg.mlp_hidden_size, bias=cfg.bias, tp_group=tp_group,
                                   sequence_parallel=sp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x`: this rank's tokens (under SP its TP shard of them), `c` `[B, hidden]`,
        `text` the embedded caption tokens `[B, L, hidden]` (models with `text_dim`)."""
        modulation = self.adaLN_modulation(c)
        if self.sequence_parallel:
            # Applied to this rank's tokens only: the TP ranks' gradients add up.
            modulation = copy_to_group(modulation, self.tp_group)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if text is not None:
            shard_group = self.tp_group if self.sequence_parallel else None
            h = layer_norm32(self.norm_cross, x, shard_group).to(x.dtype)
            x = x + self.cross_attn(h, text, text_mask)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to the patch values; both zero-initialised."""

    def __init__(self, hidden_size: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(hidden_size,
                                                                      2 * hidden_size))
        self.linear = _zero_linear(hidden_size, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(VideoTransformer):
    """The MHLA DiT on this rank's share of a `DP x CP x TP` layout.

    Args:
        cfg: the model (validated here, and checked against the TP and CP sizes).
        tp_group, cp_group: process groups; default megatron-core's TP and CP groups
            (`mhla_dist.parallel.build_topology`). Single-process use passes a group of one.
    """

    def __init__(self, cfg: DiTConfig, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(cfg, tp_group=tp_group, cp_group=cp_group,
                         sequence_parallel=sequence_parallel)
        if cfg.arch != "dit":
            raise ValueError(f"arch={cfg.arch!r}: DiT builds arch 'dit'; use "
                             "mhla_dist.model.build_dit for any arch")
        h, sp = cfg.hidden_size, self.sequence_parallel
        if sp:
            sequence_shard_check(cfg.num_tokens // self.cp, self.tp)
        pos = sincos_pos_embed_3d(h, cfg.patch_grid, cfg.block_grid)  # [N, h], block-major
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        mixing = block_grid_mixing(tuple(cfg.block_grid), cfg.mixing_init)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, i, mixing_init=mixing, tp_group=self.tp_group,
                     cp_group=self.cp_group, sequence_parallel=sp) for i in range(cfg.depth))
        self.final_layer = FinalLayer(h, cfg.patch_dim)

    def forward_tokens(self, tokens_local: torch.Tensor, t: torch.Tensor,
                       labels: torch.Tensor | None = None,
                       caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's tokens `[B, N/cp, patch_dim]` -> its velocity tokens, same shape, in
        the model's dtype: inputs (clips, captions) are cast to it here, so fp32 clips and
        noise feed a bf16 engine."""
        tokens_local = tokens_local.to(self.dtype)
        x = self.x_embedder(tokens_local) + self.pos_embed[self.token_slice].to(self.dtype)
        if self.sequence_parallel:  # the blocks keep this TP rank's shard of the tokens
            x = split_to_group(x, 1, self.tp_group)
        c = self.condition(t, labels, caption)
        text, text_mask = self.embed_text(x.shape[0], text, text_mask)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, text, text_mask, use_reentrant=False)
            else:
                x = block(x, c, text, text_mask)
        if self.sequence_parallel:  # the final layer and the loss are replicated over TP
            x = gather_for_replicated(x, 1, self.tp_group)
        return self.final_layer(x, c)
