"""Run the trainer on spawned gloo ranks over the embedded corpus, for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_RUN = [
    "model.vocab_size=257", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.max_seq_len=64", "model.block_size=16", "data.micro_batch_size=2",
    "logging.interval=1", "logging.wandb.mode=disabled", "optim.lr=3e-3",
    "schedule.kind=constant", "data.shuffle_buffer=16",
]


TINY_DIT_RUN = [
    "model.kind=dit", "model.in_channels=3", "model.frames=8", "model.height=16",
    "model.width=16", "model.block_grid=[2,2,2]", "model.hidden_size=32", "model.depth=2",
    "model.num_heads=2", "model.num_classes=4", "data.kind=video", "data.micro_batch_size=4",
    "logging.interval=1", "logging.wandb.mode=disabled", "optim.lr=1e-3",
    "schedule.kind=constant", "data.shuffle_buffer=8",
]


def clips(tmp: Path) -> list[str]:
    from mhla_dist.data import write_synthetic_video

    write_synthetic_video(tmp / "clips", num_clips=32, frames=8, size=16, clips_per_shard=8)
    return [f"data.train={tmp / 'clips'}"]


def corpus(tmp: Path) -> list[str]:
    from mhla_dist.data import build_default_corpus

    info = build_default_corpus(tmp / "corpus", docs_per_shard=8)
    return [f"data.train={info.train}", f"data.eval={info.eval}"]


def short_documents(out: Path, num: int = 60, seed: int = 0) -> str:
    """Shards of `num` short byte-tokenised documents; their brace pattern."""
    import numpy as np

    from mhla_dist.data import ByteTokenizer, ShardSink, default_documents, token_sample

    text = " ".join(default_documents()[:3])
    rng, tok, at = np.random.default_rng(seed), ByteTokenizer(), 0
    with ShardSink(out, "eval", maxcount=20) as sink:
        for i in range(num):
            n = int(rng.integers(10, 151))
            tokens = tok.encode(text[at:at + n])
            sink.write(token_sample(i, tokens, doc_id=i), tokens=len(tokens))
            at += n
    return sink.summary.pattern


def train_rank_fn(rank, world, overrides, patch=None, base=None):
    """Train with `overrides` over `base` (default the tiny LM); returns the metrics rows
    (rank 0) and the parameters."""
    from mhla_dist.config import load_config
    from mhla_dist.train import Trainer

    cfg = load_config(None, (TINY_RUN if base is None else base) + list(overrides))
    trainer = Trainer(cfg)
    if patch is not None:
        patch(trainer)
    trainer.train()
    rows = []
    if rank == 0:
        path = Path(cfg.run_dir) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    return {"rows": rows, "params": params, "topology": trainer.topo.describe()}


def losses(result) -> list[float]:
    return [row["loss"] for row in result["rows"]]


def gathered_params(result) -> dict[str, torch.Tensor]:
    return result["params"]
