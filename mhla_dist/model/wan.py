"""The Wan2.1 video transformer (`arch: wan`) with MHLA self-attention.

    clip [B, C, F, H, W] --patchify (block-major)--> this CP rank's tokens [B, N/cp, p]
      -> patch embedding (Conv3d as a linear); no absolute position embedding
      -> depth x WanBlock(x, e, text): e [B, 6, hidden] = time_proj(silu(temb)), one per
         model, plus each block's learned table; text = the embedded caption tokens
      -> head: LayerNorm, shift/scale = its table + temb, linear -> velocity tokens

    WanBlock: x += gate * self_attn(norm1(x) * (1 + scale) + shift)   q/k RMSNorm, 3-D RoPE
              x += cross_attn(norm2(x), text)                          (affine LayerNorm)
              x += c_gate * ffn(norm3(x) * (1 + c_scale) + c_shift)    GELU-tanh MLP

This is diffusers' `WanTransformer3DModel` (text-to-video, no image embedding) with the
tokens in block-major order: norms, modulation and residuals in fp32 as there, so a
checkpoint imported with every self-attention softmax (`softmax_layers`) computes what
Wan computes (`tools/convert_checkpoint.py import-wan`). Self-attention is MHLA over the
`block_grid` tiles otherwise, the RoPE applied before its feature map. Class labels and a
pooled caption, when the config has them, are added to the time embedding `temb`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mhla_dist.config.dit import DiTConfig
from mhla_dist.parallel.collectives import gather_for_replicated, split_to_group
from mhla_dist.parallel.tp_layers import ParallelGeluMLP, sequence_shard_check
from mhla_kernels import block_grid_mixing

from .video_base import VideoTransformer
from .wan_layers import (
    CrossAttention,
    WanSelfAttention,
    fp32,
    layer_norm32,
    replicated_on_tokens,
    rope_tables,
)

__all__ = ["WanBlock", "WanDiT", "WanHead"]


def _modulation_table(rows: int, hidden_size: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, rows, hidden_size) / hidden_size**0.5)


class WanBlock(nn.Module):
    """Wan2.1's transformer block (module docstring); parameters `modulation` = Wan's
    `scale_shift_table`."""

    def __init__(self, cfg: DiTConfig, layer: int, *, mixing_init: torch.Tensor, tp_group,
                 cp_group, sequence_parallel: bool = False) -> None:
        super().__init__()
        h, eps, sp = cfg.hidden_size, cfg.norm_eps, sequence_parallel
        self.tp_group, self.sequence_parallel = tp_group, sp
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=eps)
        self.attn = WanSelfAttention(
            h, cfg.num_heads, softmax=layer in cfg.softmax_layers, block_size=cfg.block_size,
            max_blocks=cfg.num_blocks, feature=cfg.feature_map,
            per_head_mixing=cfg.per_head_mixing, mixing_init=mixing_init, eps=eps,
            tp_group=tp_group, cp_group=cp_group, sequence_parallel=sp)
        self.softmax = self.attn.softmax
        if cfg.text_dim:
            self.norm2 = nn.LayerNorm(h, eps=eps)
            self.cross_attn = CrossAttention(h, cfg.num_heads, eps=eps, tp_group=tp_group,
                                             sequence_parallel=sp)
        self.norm3 = nn.LayerNorm(h, elementwise_affine=False, eps=eps)
        self.mlp = ParallelGeluMLP(h, cfg.mlp_hidden_size, bias=True, tp_group=tp_group,
                                   sequence_parallel=sp)
        self.modulation = _modulation_table(6, h)

    def forward(self, x: torch.Tensor, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` this rank's tokens `[B, n, hidden]` (under SP its TP shard), `e` the time
        projection `[B, 6, hidden]`, `rope` the `(cos, sin)` of this CP rank's tokens."""
        mod = replicated_on_tokens(fp32(self.modulation) + fp32(e), self.tp_group,
                                   self.sequence_parallel)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, None] for m in mod.unbind(1))
        h = (layer_norm32(self.norm1, x) * (1 + scale) + shift).to(x.dtype)
        x = (fp32(x) + fp32(self.attn(h, rope)) * gate).to(x.dtype)
        if text is not None:
            shard_group = self.tp_group if self.sequence_parallel else None
            h = layer_norm32(self.norm2, x, shard_group).to(x.dtype)
            x = x + self.cross_attn(h, text, text_mask)
        h = (layer_norm32(self.norm3, x) * (1 + c_scale) + c_shift).to(x.dtype)
        return (fp32(x) + fp32(self.mlp(h)) * c_gate).to(x.dtype)


class WanHead(nn.Module):
    """LayerNorm, shift and scale from a learned table plus `temb`, then the linear to the
    patch values (zero-initialised, as Wan's own initialisation does)."""

    def __init__(self, hidden_size: int, patch_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.modulation = _modulation_table(2, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (fp32(self.modulation) + fp32(temb)[:, None]).chunk(2, dim=1)
        return self.linear((layer_norm32(self.norm, x) * (1 + scale) + shift).to(x.dtype))


class WanDiT(VideoTransformer):
    """The Wan2.1 transformer with MHLA self-attention on this rank's share of a
    `DP x CP x TP` layout; the same interface as `DiT` (`forward`, `velocity`, ...)."""

    def __init__(self, cfg: DiTConfig, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__(cfg, tp_group=tp_group, cp_group=cp_group,
                         sequence_parallel=sequence_parallel)
        if cfg.arch != "wan":
            raise ValueError(f"arch={cfg.arch!r}: WanDiT builds arch 'wan'")
        h, sp = cfg.hidden_size, self.sequence_parallel
        if sp:
            sequence_shard_check(cfg.num_tokens // self.cp, self.tp)
        self.time_proj = nn.Linear(h, 6 * h)
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        mixing = block_grid_mixing(tuple(cfg.block_grid), cfg.mixing_init)
        self.blocks = nn.ModuleList(
            WanBlock(cfg, i, mixing_init=mixing, tp_group=self.tp_group,
                     cp_group=self.cp_group, sequence_parallel=sp) for i in range(cfg.depth))
        self.head = WanHead(h, cfg.patch_dim, cfg.norm_eps)

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[N/cp, head_dim/2]` fp32 of this CP rank's tokens. Not buffers: a
        bf16 engine would round the angles' cosines to 8 bits (Wan keeps them fp32 too)."""
        if device not in self._rope:
            cfg = self.cfg
            tables = rope_tables(cfg.head_dim, cfg.patch_grid, cfg.block_grid, cfg.rope_theta)
            self._rope[device] = tuple(t[self.token_slice].to(device, torch.float32)
                                       for t in tables)
        return self._rope[device]

    def forward_tokens(self, tokens_local: torch.Tensor, t: torch.Tensor,
                       labels: torch.Tensor | None = None,
                       caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's tokens `[B, N/cp, patch_dim]` -> its velocity tokens, same shape, in
        the model's dtype (inputs are cast to it)."""
        x = self.x_embedder(tokens_local.to(self.dtype))
        if self.sequence_parallel:
            x = split_to_group(x, 1, self.tp_group)
        temb = self.condition(t, labels, caption)
        e = self.time_proj(torch.nn.functional.silu(temb)).unflatten(1, (6, -1))
        text, text_mask = self.embed_text(x.shape[0], text, text_mask)
        rope = self.rope(x.device)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e, rope, text, text_mask, use_reentrant=False)
            else:
                x = block(x, e, rope, text, text_mask)
        if self.sequence_parallel:
            x = gather_for_replicated(x, 1, self.tp_group)
        return self.head(x, temb)
