"""What every video transformer of `mhla_dist.model` shares, whatever its block: the
layout (TP and CP groups, this CP rank's slice of the block-major tokens), the patch
embedding, the conditioning inputs and their checks, patchify / unpatchify and the
sampler's `velocity`.

Conditioning inputs, all optional as the config asks:
- `labels [B]` (`num_classes > 0`; `num_classes` is the null class);
- `caption [B, caption_dim]`, a pooled caption vector (None: zeros, the dropped caption);
- `text [B, L, text_dim]` caption tokens with `text_mask [B, L]` (True = a real token,
  None = all are); None means the dropped caption: one zero token.
"""

from __future__ import annotations

import torch
from torch import nn

from mhla_dist.config.dit import DiTConfig
from mhla_dist.parallel import gather_from_group

from .dit_layers import CaptionEmbedder, LabelEmbedder, TimestepEmbedder, resolve_groups
from .patchify import patchify, unpatchify
from .rectified_flow import velocity_from_sample
from .wan_layers import TextEmbedder


class VideoTransformer(nn.Module):
    """Base of `DiT` and `WanDiT`: subclasses build the blocks and `forward_tokens`."""

    def __init__(self, cfg: DiTConfig, *, tp_group=None, cp_group=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.tp_group, self.tp, self.cp_group, self.cp, self.cp_rank = \
            resolve_groups(tp_group, cp_group)
        cfg.check_parallel(self.tp, self.cp)
        h, n_local = cfg.hidden_size, cfg.num_tokens // self.cp
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.token_slice = slice(self.cp_rank * n_local, (self.cp_rank + 1) * n_local)
        # The linear form of a Conv3d(C, hidden, patch, stride=patch): tokens hold their
        # patch as (C, pt, ph, pw), the conv weight's layout.
        self.x_embedder = nn.Linear(cfg.patch_dim, h)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(cfg.num_classes, h) if cfg.num_classes else None
        self.caption_embedder = CaptionEmbedder(cfg.caption_dim, h) if cfg.caption_dim else None
        self.text_embedder = TextEmbedder(cfg.text_dim, h) if cfg.text_dim else None

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

    def embed_text(self, batch: int, text: torch.Tensor | None,
                   text_mask: torch.Tensor | None):
        """`(tokens [B, L, hidden], mask [B, L] or None)` of the caption tokens, or
        `(None, None)` for a model without cross-attention."""
        cfg = self.cfg
        if self.text_embedder is None:
            if text is not None:
                raise ValueError("text (caption tokens) given to a model with text_dim=0")
            return None, None
        if text is None:  # the dropped caption: one zero token
            text = torch.zeros(batch, 1, cfg.text_dim, device=self.x_embedder.weight.device)
            text_mask = None
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text of shape {tuple(text.shape)}; the model takes caption "
                             f"tokens [B, L, text_dim] = [{batch}, L, {cfg.text_dim}] (store "
                             f"[L, {cfg.text_dim}] per clip as emb.npy)")
        if text_mask is not None:
            if tuple(text_mask.shape) != tuple(text.shape[:2]):
                raise ValueError(f"text_mask of shape {tuple(text_mask.shape)} does not fit "
                                 f"text {tuple(text.shape)}: expected [B, L]")
            text_mask = text_mask.to(device=text.device, dtype=torch.bool)
        return self.text_embedder(text.to(self.dtype)), text_mask

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
                       caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, clip: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy clip `[B, C, F, H, W]` (the same on every CP and TP rank), time `t [B]` in
        [0, 1] and the conditioning (module docstring) -> the predicted velocity for this
        CP rank's tokens, `[B, N/cp, C*pt*ph*pw]`. Under `prediction="sample"` the
        network's output is the clean clip, turned into that velocity here."""
        tokens = self.local_tokens(clip)
        out = self.forward_tokens(tokens, t, labels, caption, text, text_mask)
        if self.cfg.prediction == "sample":
            out = velocity_from_sample(tokens, out, t)
        return out

    def velocity(self, clip: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                 caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The whole predicted velocity as a clip `[B, C, F, H, W]` (gathered over CP):
        what a sampler integrates."""
        return self.unpatchify(self.gather_tokens(
            self(clip, t, labels, caption, text, text_mask)))

    def num_parameters(self) -> int:
        """Parameters held by this rank (its TP shards); `dit_num_parameters(cfg)` is the
        whole model."""
        return sum(p.numel() for p in self.parameters())
