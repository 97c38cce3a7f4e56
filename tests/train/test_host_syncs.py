"""One blocking host sync per optimizer step outside logging: with two micro-batches, a
step that does not log reads one device value into Python (the closing all-reduce), at
ZeRO 0 and 2, fp32 and bf16. Every tensor-to-Python conversion (`item`, `tolist`,
`float(t)`, `int(t)`, `bool(t)`) made by this package during such a step is recorded
with its caller; DeepSpeed's own are listed separately (not ours to remove)."""

import sys

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, train_rank_fn

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _record_syncs(trainer):
    step, seen, active = trainer.train_step, [], [None]

    def wrap(name, original):
        def converted(self, *args, **kwargs):
            if active[0] is not None:
                caller = sys._getframe(1)
                active[0].append(f"{caller.f_code.co_filename}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)
        return converted

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    def counted_step(batches, want_grad_norm=True):
        active[0] = []
        try:
            return step(batches, want_grad_norm=want_grad_norm)
        finally:
            seen.append((want_grad_norm, active[0]))
            active[0] = None

    trainer.train_step = counted_step
    trainer.seen_syncs = seen


def _rank_fn(rank, world, overrides):
    seen = {}

    def patch(trainer):
        _record_syncs(trainer)
        seen["syncs"] = trainer.seen_syncs

    train_rank_fn(rank, world, overrides, patch)
    return seen["syncs"]


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "bf16")])
def test_a_step_that_does_not_log_syncs_once(tmp_path, zero, precision):
    steps = run_ranks(_rank_fn, 1, [
        f"run_dir={tmp_path / 'run'}", "train.steps=4", "train.grad_accum=2",
        "logging.interval=100", f"zero.stage={zero}", f"train.precision={precision}",
        *corpus(tmp_path)])[0]
    quiet = [calls for logs, calls in steps if not logs]
    assert len(quiet) == 3  # the last step logs
    for calls in quiet:
        ours = [c for c in calls if "/mhla_dist/" in c]
        assert len(ours) == 1 and "trainer.py" in ours[0] and "tolist" in ours[0], calls
