"""What differs between model kinds in training: the model, its data, its loss.

A task's `loss(engine, batch)` returns this rank's `(sum of per-element losses, number of
elements)`; `count(batch)` is that number without a forward, so the trainer knows a whole
step's global count before the first backward and turns the sums into the step's global
mean (DESIGN §2). `set_position(step, micro)` says which draw of noise a loss belongs to
(`step=None`: the eval batch `micro`, the same at every evaluation).
"""

from __future__ import annotations

import torch

from mhla_dist.config import Config, LMConfig
from mhla_dist.data import IGNORE_INDEX, cp_slice, lm_loader
from mhla_dist.parallel import Topology


class LMTask:
    """Causal language modelling on packed token windows."""

    def __init__(self, cfg: Config, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        self.seq_len = cfg.data.seq_len or cfg.model.max_seq_len

    def build_model(self) -> torch.nn.Module:
        from mhla_dist.model.lm import MHLALanguageModel

        return MHLALanguageModel(self.cfg.model, tp_group=self.topo.tp_group,
                                 cp_group=self.topo.cp_group,
                                 sequence_parallel=self.cfg.parallel.sequence_parallel)

    def loader(self, split: str):
        d, t = self.cfg.data, self.topo
        if d.kind == "mqar":
            from mhla_dist.eval.mqar import MQARLoader

            return MQARLoader(seq_len=self.seq_len, batch_size=d.micro_batch_size,
                              num_kv_pairs=d.num_kv_pairs, vocab_size=self.cfg.model.vocab_size,
                              seed=d.seed, split=split, dp_rank=t.dp_rank)
        urls = d.train if split == "train" else d.eval
        if not urls:
            return None
        return lm_loader(urls, seq_len=self.seq_len, batch_size=d.micro_batch_size,
                         dp_rank=t.dp_rank, dp_size=t.dp, num_workers=d.workers,
                         seed=d.seed, shuffle=split == "train", shuffle_buffer=d.shuffle_buffer,
                         vocab_size=self.cfg.model.vocab_size)

    def local(self, batch: dict) -> dict:
        """This CP rank's slice of `batch` (with the global document offsets, host-side,
        when `data.document_masking`)."""
        return cp_slice(batch, self.topo.cp_rank, self.topo.cp,
                        document_masking=self.cfg.data.document_masking)

    def loss(self, engine, batch: dict):
        local = self.local(batch)
        tokens = local["input_ids"].to(self.topo.device)
        targets = local["labels"].to(self.topo.device)
        return engine(tokens, targets, IGNORE_INDEX, cu_seqlens=local.get("cu_seqlens"))

    def eval_metric_names(self) -> list[str]:
        return ["accuracy"] if self.cfg.data.kind == "mqar" else []

    def eval_metrics(self, engine, batch: dict) -> dict[str, tuple]:
        """MQAR: `(correct answers, answers)` of the greedy prediction at every scored
        position (the full logits: MQAR's vocabulary is small)."""
        if self.cfg.data.kind != "mqar":
            return {}
        local = self.local(batch)
        tokens = local["input_ids"].to(self.topo.device)
        targets = local["labels"].to(self.topo.device)
        scored = targets != IGNORE_INDEX
        correct = (engine(tokens).argmax(-1) == targets) & scored
        return {"accuracy": (correct.sum(), scored.sum())}

    def count(self, batch: dict) -> torch.Tensor:
        """This rank's target tokens (padding excluded) in `batch`, counted on the host
        batch (no device sync)."""
        return (self.local(batch)["labels"] != IGNORE_INDEX).sum()

    def set_position(self, step: int | None, micro: int) -> None:
        """Which step and micro-batch the next `loss` belongs to (unused: no sampling)."""

    def samples_and_tokens(self) -> tuple[int, int]:
        """Per micro-batch of one DP replica."""
        b = self.cfg.data.micro_batch_size
        return b, b * self.seq_len

    def flops_per_token(self) -> float:
        from mhla_dist.model.lm_flops import lm_flops_per_token

        return lm_flops_per_token(self.cfg.model, self.seq_len)


def make_task(cfg: Config, topo: Topology):
    if isinstance(cfg.model, LMConfig):
        return LMTask(cfg, topo)
    from .dit_task import DiTTask

    return DiTTask(cfg, topo)
