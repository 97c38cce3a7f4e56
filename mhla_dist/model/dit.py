"""The MHLA video diffusion transformer (non-causal DiT with adaLN-Zero).

    clip [B, C, F, H, W] --patchify (block-major)--> this CP rank's tokens [B, N/cp, p]
      -> linear patch embedding + 3-D position embedding
      -> depth x DiTBlock(x, c), c = time + class (+ pooled caption) embedding
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
from mhla_dist.parallel import gather_from_group
from mhla_dist.parallel.collectives import copy_to_group, gather_for_replicated, split_to_group
from mhla_dist.parallel.softmax_attention import ParallelSoftmaxAttention
from mhla_dist.parallel.tp_layers import (
    ParallelGeluMLP,
    ParallelMHLAttention,
    sequence_shard_check,
)
from mhla_kernels import block_grid_mixing

from .dit_cost import dit_flops_per_sample, dit_num_parameters
from .dit_layers import (
    CaptionEmbedder,
    LabelEmbedder,
    TimestepEmbedder,
    modulate,
    resolve_groups,
    sincos_pos_embed_3d,
)
from .patchify import patchify, unpatchify

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
        self.mlp = ParallelGeluMLP(h, cfg.mlp_hidden_size, bias=cfg.bias, tp_group=tp_group,
                                   sequence_parallel=sp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """`x`: this rank's tokens (under SP its TP shard of them), `c` `[B, hidden]`."""
        modulation = self.adaLN_modulation(c)
        if self.sequence_parallel:
            # Applied to this rank's tokens only: the TP ranks' gradients add up.
            modulation = copy_to_group(modulation, self.tp_group)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
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


class DiT(nn.Module):
    """The MHLA DiT on this rank's share of a `DP x CP x TP` layout.

    Args:
        cfg: the model (validated here, and checked against the TP and CP sizes).
        tp_group, cp_group: process groups; default megatron-core's TP and CP groups
            (`mhla_dist.parallel.build_topology`). Single-process use passes a group of one.
    """

    def __init__(self, cfg: DiTConfig, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.tp_group, self.tp, self.cp_group, self.cp, self.cp_rank = \
            resolve_groups(tp_group, cp_group)
        cfg.check_parallel(self.tp, self.cp)
        h, n_local = cfg.hidden_size, cfg.num_tokens // self.cp
        sp = self.sequence_parallel = sequence_parallel and self.tp > 1
        if sp:
            sequence_shard_check(n_local, self.tp)
        self.token_slice = slice(self.cp_rank * n_local, (self.cp_rank + 1) * n_local)
        self.x_embedder = nn.Linear(cfg.patch_dim, h)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        pos = sincos_pos_embed_3d(h, cfg.patch_grid, cfg.block_grid)  # [N, h], block-major
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(cfg.num_classes, h) if cfg.num_classes else None
        self.caption_embedder = CaptionEmbedder(cfg.caption_dim, h) if cfg.caption_dim else None
        mixing = block_grid_mixing(tuple(cfg.block_grid), cfg.mixing_init)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, i, mixing_init=mixing, tp_group=self.tp_group,
                     cp_group=self.cp_group, sequence_parallel=sp) for i in range(cfg.depth))
        self.final_layer = FinalLayer(h, cfg.patch_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (bf16 under a bf16 engine), which inputs are cast to."""
        return self.x_embedder.weight.dtype

    # ---- conditioning ----------------------------------------------------------------
    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.cfg.null_class

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None = None,
                  caption: torch.Tensor | None = None) -> torch.Tensor:
        """`c [B, hidden]` from time `t [B]` in [0, 1], labels `[B]` and a pooled caption
        `[B, caption_dim]` (None: the dropped caption, zeros)."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if labels is None:
                raise ValueError(f"num_classes={self.cfg.num_classes}: the model needs labels "
                                 f"(use {self.null_class} for the null class)")
            c = c + self.y_embedder(labels)
        elif labels is not None:
            raise ValueError("labels given to a model with num_classes=0")
        if self.caption_embedder is not None:
            if caption is None:
                caption = c.new_zeros(c.shape[0], self.cfg.caption_dim)
            if tuple(caption.shape) != (c.shape[0], self.cfg.caption_dim):
                raise ValueError(
                    f"caption of shape {tuple(caption.shape)}; the model takes one pooled "
                    f"caption embedding per clip, [B, caption_dim] = [{c.shape[0]}, "
                    f"{self.cfg.caption_dim}] (store a pooled [D] vector as emb.npy)")
            c = c + self.caption_embedder(caption.to(c.dtype))
        elif caption is not None:
            raise ValueError("caption given to a model with caption_dim=0")
        return c

    # ---- tokens ----------------------------------------------------------------------
    def patchify(self, clip: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` -> all block-major tokens `[B, N, patch_dim]`."""
        expect = (self.cfg.in_channels, self.cfg.frames, self.cfg.height, self.cfg.width)
        if clip.dim() != 5 or tuple(clip.shape[1:]) != expect:
            raise ValueError(f"clip of shape {tuple(clip.shape)}; the model expects "
                             f"[B, {', '.join(map(str, expect))}] (C, F, H, W)")
        return patchify(clip, self.cfg.patch, self.cfg.block_grid)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """All tokens `[B, N, patch_dim]` -> `[B, C, F, H, W]`."""
        cfg = self.cfg
        return unpatchify(tokens, (cfg.in_channels, cfg.frames, cfg.height, cfg.width),
                          cfg.patch, cfg.block_grid)

    def local_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """This CP rank's slice `[B, N/cp, patch_dim]` of the clip's tokens (e.g. the
        velocity target)."""
        return self.patchify(clip)[:, self.token_slice]

    def gather_tokens(self, tokens_local: torch.Tensor) -> torch.Tensor:
        """All-gather the CP ranks' token slices into `[B, N, patch_dim]` (differentiable)."""
        return gather_from_group(tokens_local, 1, self.cp_group)

    # ---- forward ---------------------------------------------------------------------
    def forward_tokens(self, tokens_local: torch.Tensor, t: torch.Tensor,
                       labels: torch.Tensor | None = None,
                       caption: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's tokens `[B, N/cp, patch_dim]` -> its velocity tokens, same shape, in
        the model's dtype: inputs (clips, captions) are cast to it here, so fp32 clips and
        noise feed a bf16 engine."""
        tokens_local = tokens_local.to(self.dtype)
        x = self.x_embedder(tokens_local) + self.pos_embed[self.token_slice].to(self.dtype)
        if self.sequence_parallel:  # the blocks keep this TP rank's shard of the tokens
            x = split_to_group(x, 1, self.tp_group)
        c = self.condition(t, labels, caption)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        if self.sequence_parallel:  # the final layer and the loss are replicated over TP
            x = gather_for_replicated(x, 1, self.tp_group)
        return self.final_layer(x, c)

    def forward(self, clip: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                caption: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy clip `[B, C, F, H, W]` (the same on every CP and TP rank), time `t [B]` in
        [0, 1], labels `[B]`, pooled caption `[B, caption_dim]` -> the predicted velocity
        for this CP rank's tokens, `[B, N/cp, C*pt*ph*pw]`."""
        return self.forward_tokens(self.local_tokens(clip), t, labels, caption)

    def velocity(self, clip: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                 caption: torch.Tensor | None = None) -> torch.Tensor:
        """The whole predicted velocity as a clip `[B, C, F, H, W]` (gathered over CP):
        what a sampler integrates."""
        return self.unpatchify(self.gather_tokens(self(clip, t, labels, caption)))

    def num_parameters(self) -> int:
        """Parameters held by this rank (its TP shards); `dit_num_parameters(cfg)` is the
        whole model."""
        return sum(p.numel() for p in self.parameters())
