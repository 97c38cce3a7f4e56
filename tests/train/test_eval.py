"""Evaluation scores the same fixed set every time (the first `train.eval_steps` eval
batches; for the DiT also the same noise and timesteps), runs at every `eval_interval`
whatever `logging.interval` is, and leaves training exactly as it is without it."""

import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_DIT_RUN, clips, corpus, losses, train_rank_fn


def _evals(result) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in result["rows"] if "eval_loss" in r}


def _spread(evals: dict[int, float]) -> float:
    values = list(evals.values())
    return (max(values) - min(values)) / min(values)


def test_lm_eval_is_a_fixed_set_at_every_interval(tmp_path):
    # lr ~ 0: the weights barely change, so a fixed eval set scores the same every time
    run = [f"run_dir={tmp_path / 'run'}", "train.steps=6", "train.eval_interval=2",
           "train.eval_steps=2", "logging.interval=3", "optim.lr=1e-12", *corpus(tmp_path)]
    r0 = run_ranks(train_rank_fn, 1, run)[0]
    evals = _evals(r0)
    assert sorted(evals) == [2, 4, 6], evals
    assert _spread(evals) < 1e-6, evals
    assert [r["step"] for r in r0["rows"]] == [2, 3, 4, 6]


def test_dit_eval_draws_the_same_noise_every_time(tmp_path):
    data = clips(tmp_path)
    run = [f"run_dir={tmp_path / 'run'}", "train.steps=3", "train.eval_interval=1",
           "train.eval_steps=2", "optim.lr=1e-12", *data, data[0].replace("train", "eval")]
    evals = _evals(run_ranks(train_rank_fn, 1, run, None, TINY_DIT_RUN)[0])
    assert sorted(evals) == [1, 2, 3] and _spread(evals) < 1e-6, evals


def test_evaluating_does_not_change_training(tmp_path):
    data = corpus(tmp_path)
    common = ["parallel.cp=2", "train.steps=4", "checkpoint.interval=2", *data]
    plain = run_ranks(train_rank_fn, 2, [f"run_dir={tmp_path / 'plain'}", *common])[0]
    with_eval = run_ranks(train_rank_fn, 2, [f"run_dir={tmp_path / 'eval'}", *common,
                                             "train.eval_interval=1", "train.eval_steps=3"])[0]
    assert losses(plain) == losses(with_eval)
    for name, p in plain["params"].items():
        assert torch.equal(p, with_eval["params"][name]), name
    # the checkpoints' data-loader position is the training loader's alone
    a = torch.load(tmp_path / "plain/checkpoints/step00000002/trainer_state/rank00000.pt",
                   weights_only=False)
    b = torch.load(tmp_path / "eval/checkpoints/step00000002/trainer_state/rank00000.pt",
                   weights_only=False)
    assert a["train_loader"] == b["train_loader"]
