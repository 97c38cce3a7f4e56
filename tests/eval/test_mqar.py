"""MQAR data as Zoology makes it (keys and values from the two vocabulary halves, every
key queried once after the pairs, only the answers scored), seeded and resumable; its
accuracy metric; and a tiny MQAR run through `python -m mhla_dist.train` logging it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mhla_dist.data import IGNORE_INDEX
from mhla_dist.eval.mqar import MQARLoader, mqar_example
from tests.train.launching import ROOT, launch_env

V, N, D = 64, 63, 6


def test_an_example_holds_the_pairs_then_each_key_once_without_its_value():
    """Zoology's layout: the answers never appear after the pairs (an answer written into
    the input would let a model score without recall, by naming the values not yet
    given)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens, targets = mqar_example(rng, N, D, V)
        assert tokens.shape == (N + 1,) and targets.shape == (N,)
        keys, values = tokens[0:2 * D:2], tokens[1:2 * D:2]
        assert len(set(keys)) == D and ((1 <= keys) & (keys < V // 2)).all()
        assert len(set(values)) == D and ((V // 2 <= values) & (values < V)).all()
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        scored = np.flatnonzero(targets != IGNORE_INDEX)
        assert len(scored) == D and (scored >= 2 * D).all() and not (scored % 2).any()
        assert sorted(tokens[scored].tolist()) == sorted(pairs)  # every key once
        for p in scored:
            assert targets[p] == pairs[tokens[p]]
        assert not (tokens[2 * D:] >= V // 2).any()  # no value after the pairs
        rest = np.setdiff1d(np.arange(2 * D, N + 1), scored)
        assert not tokens[rest].any()  # every other position is token 0


def test_query_gaps_follow_the_power_law():
    """Zoology's power_a = 0.01 puts most queries close to the pairs."""
    rng = np.random.default_rng(1)
    first = [np.flatnonzero(mqar_example(rng, 255, 4, V)[1] != IGNORE_INDEX) for _ in range(200)]
    slots = (256 - 8) // 2
    mean_slot = np.mean([(p - 8) / 2 for p in first])
    assert mean_slot < 0.35 * slots  # uniform would be ~0.5


def test_loader_is_seeded_resumable_and_rewinds():
    a = MQARLoader(seq_len=N, batch_size=3, num_kv_pairs=D, vocab_size=V, seed=5)
    it = iter(a)
    first, second = next(it), next(it)
    assert first["input_ids"].shape == first["labels"].shape == (3, N)
    assert not torch.equal(first["input_ids"], second["input_ids"])
    b = MQARLoader(seq_len=N, batch_size=3, num_kv_pairs=D, vocab_size=V, seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(iter(b))["input_ids"], next(it)["input_ids"])
    a.rewind()
    assert torch.equal(next(iter(a))["input_ids"], first["input_ids"])
    other_rank = MQARLoader(seq_len=N, batch_size=3, num_kv_pairs=D, vocab_size=V, seed=5,
                            dp_rank=1)
    assert not torch.equal(next(iter(other_rank))["input_ids"], first["input_ids"])
    evals = MQARLoader(seq_len=N, batch_size=3, num_kv_pairs=D, vocab_size=V, seed=5,
                       split="eval")
    assert not torch.equal(next(iter(evals))["input_ids"], first["input_ids"])
    with pytest.raises(ValueError, match="another stream"):
        MQARLoader(seq_len=N, batch_size=3, num_kv_pairs=D + 1, vocab_size=V,
                   seed=5).load_state_dict(a.state_dict())


def test_impossible_shapes_are_named():
    with pytest.raises(ValueError, match="num_kv_pairs=20 needs seq_len"):
        MQARLoader(seq_len=63, batch_size=1, num_kv_pairs=20, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size=16 has 7 keys"):
        MQARLoader(seq_len=63, batch_size=1, num_kv_pairs=8, vocab_size=16)


class _Oracle:
    """An "engine" whose logits put all mass on the labels (or on token 0)."""

    def __init__(self, labels, right):
        self.labels, self.right = labels, right

    def __call__(self, tokens):
        logits = torch.zeros(*tokens.shape, V)
        if self.right:
            logits.scatter_(-1, self.labels.clamp(min=0)[..., None], 1.0)
        else:
            logits[..., 0] = 1.0
        return logits


def test_accuracy_counts_only_the_answers():
    from types import SimpleNamespace

    from mhla_dist.config import load_config
    from mhla_dist.train.tasks import LMTask

    cfg = load_config(None, ["data.kind=mqar", f"model.vocab_size={V}", "model.max_seq_len=64",
                             "model.block_size=16", f"data.num_kv_pairs={D}"])
    task = LMTask(cfg, SimpleNamespace(cp_rank=0, cp=1, device=torch.device("cpu")))
    batch = next(iter(MQARLoader(seq_len=64, batch_size=4, num_kv_pairs=D, vocab_size=V)))
    for right, expect in ((True, 1.0), (False, 0.0)):
        correct, count = task.eval_metrics(_Oracle(batch["labels"], right), batch)["accuracy"]
        assert count == 4 * D and correct / count == expect


def test_a_tiny_mqar_run_logs_eval_accuracy(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mhla_dist.train", "--config", "configs/eval/mqar_64x4.yaml",
         f"run_dir={tmp_path / 'run'}", "train.steps=6", "train.eval_interval=3",
         "train.eval_steps=2", "logging.interval=3", "logging.wandb.mode=disabled",
         "data.micro_batch_size=8"], cwd=ROOT, env=launch_env(), capture_output=True,
        text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_loss"] > 0 for r in rows)
