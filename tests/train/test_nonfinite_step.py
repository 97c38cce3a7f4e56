"""A step with a non-finite micro-batch on one rank is skipped whole on every rank, at
every ZeRO stage, with and without gradient accumulation, in fp32 and bf16: the fp32
master weights and Adam's state after it are exactly those before it, and the run goes
on (before the fix, grad_accum=2 crashed in DeepSpeed's grad-norm code, and a bad
micro-batch's step was taken with the other micro-batches' gradients)."""

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_RUN, corpus


def _optimizer_state(engine) -> list[torch.Tensor]:
    state = engine.basic_optimizer.state
    return [t.detach().clone() for s in state.values() for t in s.values()
            if torch.is_tensor(t)]


def _rank_fn(rank, world, overrides, bad_step, bad_micro):
    import torch.distributed as dist

    from mhla_dist.config import load_config
    from mhla_dist.train import Trainer
    from mhla_dist.train.master_weights import master_state_dict

    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    loss, step = trainer.task.loss, trainer.train_step
    seen = {}

    def patched_loss(engine, batch):
        total, count = loss(engine, batch)
        if dist.get_rank() == 1 and trainer.step == bad_step and trainer.task_micro == bad_micro:
            total = total * float("nan")
        return total, count

    set_position = trainer.task.set_position

    def track(step_, micro):
        trainer.task_micro = micro
        set_position(step_, micro)

    def watched_step(batches, **kwargs):
        if trainer.step == bad_step:
            seen["before"] = (master_state_dict(trainer.engine, trainer.topo.tp_group),
                              _optimizer_state(trainer.engine))
        out = step(batches, **kwargs)
        if trainer.step == bad_step:
            seen["after"] = (master_state_dict(trainer.engine, trainer.topo.tp_group),
                             _optimizer_state(trainer.engine))
            seen["out"] = out
        return out

    trainer.task.loss, trainer.task.set_position, trainer.train_step = \
        patched_loss, track, watched_step
    trainer.train()
    final = master_state_dict(trainer.engine, trainer.topo.tp_group)
    return {**seen, "final": final}


CASES = {
    "zero0-ga2-micro0": (0, 2, 0, "fp32"),
    "zero1-ga2-micro1": (1, 2, 1, "fp32"),
    "zero2-ga1": (2, 1, 0, "fp32"),
    "zero2-ga2-micro1-bf16": (2, 2, 1, "bf16"),
    "zero3-ga2-micro0": (3, 2, 0, "fp32"),
    "zero0-ga2-micro1-bf16": (0, 2, 1, "bf16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_nonfinite_micro_batch_skips_the_step_whole(tmp_path, case):
    stage, ga, micro, precision = CASES[case]
    run = [f"run_dir={tmp_path / 'run'}", f"zero.stage={stage}", f"train.grad_accum={ga}",
           f"train.precision={precision}", "train.steps=4", "data.micro_batch_size=1",
           "optim.weight_decay=0.1", *corpus(tmp_path)]
    r0, r1 = run_ranks(_rank_fn, 2, run, 2, micro)  # DP = 2; the third step is bad
    for r in (r0, r1):
        assert r["out"]["skipped"], r["out"]
        weights_before, opt_before = r["before"]
        weights_after, opt_after = r["after"]
        for name, w in weights_before.items():
            assert torch.equal(w, weights_after[name]), f"{name} moved in a skipped step"
        assert len(opt_before) == len(opt_after) > 0
        for a, b in zip(opt_before, opt_after, strict=True):
            assert torch.equal(a, b), "Adam's state moved in a skipped step"
        assert all(torch.isfinite(w).all() for w in r["final"].values())
        moved = [n for n, w in r["final"].items() if not torch.equal(w, weights_after[n])]
        assert moved, "the step after the skipped one did not train"
    for name, w in r0["final"].items():
        assert torch.equal(w, r1["final"][name]), f"DP replicas differ in {name}"
