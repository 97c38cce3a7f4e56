"""Training the video DiT with rectified flow on clip shards.

Noise, timesteps and label and caption dropout come from a generator seeded by (seed,
step, micro-batch, DP rank): the same on every TP and CP rank of a replica (they must see
the same noisy clip), different across replicas and steps, and reproduced exactly after a
resume. Evaluation draws from (seed, eval batch index, DP rank) instead, so every
evaluation scores the same noisy clips; it drops no labels or captions.

Clips are handed to the model as float32 (the model casts them to its own dtype);
captions (`model.caption_dim > 0`) come from the shards' `emb.npy` and a dropped caption
is the zero vector, the unconditional input the sampler's guidance uses. Caption tokens
(`model.text_dim > 0`, `emb.npy` `[L, text_dim]`) come padded with their mask; a dropped
one is all zeros, all attended.
"""

from __future__ import annotations

import torch

from mhla_dist.config import Config
from mhla_dist.data import video_loader
from mhla_dist.parallel import Topology


class _EngineAsModel:
    """What `rectified_flow_loss` needs: the engine's forward and the DiT's token slicing."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __call__(self, *args):
        return self.engine(*args)

    def local_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        return self.engine.module.local_tokens(clip)


def to_model_layout(clip: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """`[B, C, F, H, W]` floats in [-1, 1] from stored clips (`[B, F, H, W, C]` frames or
    `[B, C, F, H, W]` latents; uint8 pixels are rescaled)."""
    x = clip.float() / 127.5 - 1 if clip.dtype == torch.uint8 else clip.float()
    if tuple(x.shape[1:]) == shape:
        return x
    c, f, h, w = shape
    if tuple(x.shape[1:]) == (f, h, w, c):
        return x.permute(0, 4, 1, 2, 3).contiguous()
    raise ValueError(f"clips of shape {tuple(clip.shape[1:])} do not fit the model's "
                     f"[C, F, H, W] = {list(shape)} (nor [F, H, W, C])")


class DiTTask:
    def __init__(self, cfg: Config, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        m = cfg.model
        self.shape = (m.in_channels, m.frames, m.height, m.width)
        self.step, self.micro = 0, 0
        self.patch_values = m.num_tokens // topo.cp * m.patch_dim  # per clip, this rank

    def build_model(self) -> torch.nn.Module:
        from mhla_dist.model.video import build_dit

        return build_dit(self.cfg.model, tp_group=self.topo.tp_group,
                         cp_group=self.topo.cp_group,
                         sequence_parallel=self.cfg.parallel.sequence_parallel)

    def loader(self, split: str):
        d, t = self.cfg.data, self.topo
        urls = d.train if split == "train" else d.eval
        if not urls:
            return None
        m = self.cfg.model
        text = (m.text_len, m.text_dim) if m.text_dim else None
        return video_loader(urls, batch_size=d.micro_batch_size,
                            with_label=m.num_classes > 0, with_caption=m.caption_dim > 0,
                            text_shape=text, pad_text_to_len=not m.text_mask,
                            dp_rank=t.dp_rank,
                            dp_size=t.dp, num_workers=d.workers, seed=d.seed,
                            shuffle=split == "train", shuffle_buffer=d.shuffle_buffer)

    def set_position(self, step: int | None, micro: int) -> None:
        self.step, self.micro = step, micro

    def _generator(self) -> torch.Generator:
        # Integers only: Python salts the hash of strings per process. Eval is step -1.
        step = -1 if self.step is None else self.step
        key = (self.cfg.train.seed, step, self.micro, self.topo.dp_rank)
        return torch.Generator().manual_seed(hash(key) % 2**62)

    def eval_metric_names(self) -> list[str]:
        return []

    def eval_metrics(self, engine, batch: dict) -> dict[str, tuple]:
        return {}

    def count(self, batch: dict) -> int:
        """Velocity values this rank's loss sums over: its tokens of every clip."""
        return batch["clip"].shape[0] * self.patch_values

    def loss(self, engine, batch: dict):
        from mhla_dist.model.rectified_flow import (
            drop_captions,
            drop_labels,
            rectified_flow_loss,
            sample_timesteps,
        )

        m, device = self.cfg.model, self.topo.device
        training = engine.module.training
        x0 = to_model_layout(batch["clip"], self.shape).to(device)
        g = self._generator()
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = sample_timesteps(x0.shape[0], generator=g).to(device)
        labels = batch.get("label")
        if labels is not None and m.num_classes > 0:
            labels = labels.to(device)
            if training:
                labels = drop_labels(labels, m.class_dropout, m.null_class, g)
        else:
            labels = None
        caption = None
        if m.caption_dim > 0:
            caption = batch["caption"].float()
            if caption.shape[1:] != (m.caption_dim,):
                raise ValueError(
                    f"caption embeddings (emb.npy) of shape {tuple(caption.shape[1:])}; "
                    f"model.caption_dim={m.caption_dim} takes one pooled [{m.caption_dim}] "
                    "vector per clip")
            if training:
                caption = drop_captions(caption, m.caption_dropout, g)
            caption = caption.to(device)
        text = text_mask = None
        if m.text_dim > 0:
            text = batch["text"].float()
            text_mask = batch.get("text_mask")
            if text_mask is None:  # padded to text_len: every token attended (Wan)
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool)
            if training:
                text, text_mask = drop_captions(text, m.caption_dropout, g, text_mask)
            text, text_mask = text.to(device), text_mask.to(device)
        total, count = rectified_flow_loss(_EngineAsModel(engine), x0, noise, t, labels,
                                           caption, text, text_mask)
        return total, torch.tensor(count)

    def samples_and_tokens(self) -> tuple[int, int]:
        b = self.cfg.data.micro_batch_size
        return b, b * self.cfg.model.num_tokens

    def flops_per_token(self) -> float:
        from mhla_dist.model.dit_cost import dit_flops_per_sample

        return dit_flops_per_sample(self.cfg.model) / self.cfg.model.num_tokens
