"""Sequence parallelism in training: TP2 x CP2 with SP under ZeRO-2 trains like the same
layout without it (losses and weights), and every replica of a parameter (the CP ranks of
one TP rank) stays bit-identical: the norm gains, whose gradients come from sequence
shards, are summed over TP once, neither missed nor doubled by DeepSpeed's reduction."""

import pytest
import torch

from mhla_dist.config import ConfigError, load_config
from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, losses, train_rank_fn

LAYOUT = ["parallel.tp=2", "parallel.cp=2", "zero.stage=2", "train.steps=3",
          "optim.eps=1e-3", "model.softmax_layers=[1]"]


def test_tp2xcp2_zero2_with_sp_equals_without(tmp_path):
    data = corpus(tmp_path)
    runs = {sp: run_ranks(train_rank_fn, 4, [f"run_dir={tmp_path / str(sp)}", *LAYOUT,
                                             f"parallel.sequence_parallel={sp}", *data])
            for sp in ("false", "true")}
    plain, sp = runs["false"], runs["true"]
    for a, b in zip(losses(sp[0]), losses(plain[0]), strict=True):
        assert abs(a - b) <= 1e-5 * b, (losses(sp[0]), losses(plain[0]))
    for rank in range(4):  # ranks are TP-fastest: (tp, cp) = (r % 2, r // 2)
        for name, p in plain[rank]["params"].items():
            assert (sp[rank]["params"][name] - p).abs().max() <= 1e-5, (rank, name)
    for tp_rank in (0, 1):  # CP replicas of each TP shard: bit-identical
        a, b = sp[tp_rank]["params"], sp[tp_rank + 2]["params"]
        assert all(torch.equal(a[n], b[n]) for n in a), tp_rank


def test_sequence_parallel_needs_tp_and_a_divisible_shard():
    with pytest.raises(ConfigError, match="needs parallel.tp >= 2"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="splits each context-parallel rank's 16 tokens"):
        load_config(None, ["parallel.sequence_parallel=true", "parallel.tp=3",
                           "parallel.cp=2", "model.max_seq_len=32", "model.block_size=8",
                           "model.num_heads=3", "model.head_dim=32"])
