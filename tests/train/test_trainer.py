"""The trainer on 2 CPU processes (gloo): CP = 2 with ZeRO-2 learns and keeps CP replicas
bit-identical; ZeRO 1-3 give ZeRO 0's losses; resuming is bit-exact; checkpoints are
complete-or-ignored and pruned; a NaN on one rank skips the step on all."""

import json

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_DIT_RUN, clips, corpus, losses, train_rank_fn


def test_cp2_zero2_loss_falls_and_replicas_stay_identical(tmp_path):
    run = [f"run_dir={tmp_path / 'run'}", "parallel.cp=2", "zero.stage=2", "train.steps=30",
           "train.eval_interval=10", "train.eval_steps=2", *corpus(tmp_path)]
    r0, r1 = run_ranks(train_rank_fn, 2, run)
    curve = losses(r0)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    assert any("eval_loss" in row for row in r0["rows"])
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"CP replicas differ in {name}"
    row = r0["rows"][-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert key in row, key
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "cp: 2" in saved and "stage: 2" in saved
    from safetensors.torch import load_file

    consolidated = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert consolidated.keys() == r0["params"].keys()
    assert all(torch.equal(consolidated[n], p) for n, p in r0["params"].items())


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    """2 micro-batches of 2 sequences accumulate to the step of one batch of 4 (the same
    windows, equal token counts): the same losses and parameters up to fp32 rounding.
    Adam's eps sits above the gradients' rounding noise: Mc[0, 0] only scales block 0's
    outputs, which the per-head output norm undoes, so its gradient is rounding noise that
    eps=1e-8 would turn into full-size updates of either sign."""
    data = corpus(tmp_path) + ["optim.eps=1e-3"]
    big = run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'big'}", "train.steps=3",
                                       "data.micro_batch_size=4", *data])[0]
    acc = run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'acc'}", "train.steps=3",
                                       "data.micro_batch_size=2", "train.grad_accum=2",
                                       *data])[0]
    for a, b in zip(losses(acc), losses(big), strict=True):
        assert abs(a - b) <= 1e-5 * b
    for name, p in big["params"].items():
        assert (acc["params"][name] - p).abs().max() <= 1e-5, name


def test_dit_cp2_zero2_loss_falls_and_replicas_stay_identical(tmp_path):
    run = [f"run_dir={tmp_path / 'run'}", "parallel.cp=2", "zero.stage=2", "train.steps=25",
           *clips(tmp_path)]
    r0, r1 = run_ranks(train_rank_fn, 2, run, None, TINY_DIT_RUN)
    curve = losses(r0)
    assert sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5, curve
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"CP replicas differ in {name}"


def test_zero_stages_give_the_same_losses(tmp_path):
    """DP = 2: ZeRO 1, 2 and 3 partition optimizer state, gradients and parameters over the
    two ranks; their losses match ZeRO 0's within 1e-5 relative (fp32 reductions in
    another order)."""
    data = corpus(tmp_path)
    curves = {}
    for stage in (0, 1, 2, 3):
        run = [f"run_dir={tmp_path / f'z{stage}'}", f"zero.stage={stage}", "train.steps=4",
               *data]
        curves[stage] = losses(run_ranks(train_rank_fn, 2, run)[0])
    for stage in (1, 2, 3):
        for a, b in zip(curves[stage], curves[0], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (stage, curves[stage], curves[0])


def test_resume_is_bit_exact(tmp_path):
    data = corpus(tmp_path)
    common = ["parallel.cp=2", "zero.stage=2", "checkpoint.interval=3", *data]
    full = run_ranks(train_rank_fn, 2, [f"run_dir={tmp_path / 'full'}", "train.steps=6",
                                        *common])[0]
    half = [f"run_dir={tmp_path / 'split'}", *common]
    run_ranks(train_rank_fn, 2, [*half, "train.steps=3"])
    resumed = run_ranks(train_rank_fn, 2, [*half, "train.steps=6"])[0]
    assert losses(resumed) == losses(full)  # metrics.jsonl holds both halves
    for name, p in full["params"].items():
        assert torch.equal(p, resumed["params"][name]), name
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_keep_last_and_an_incomplete_checkpoint_is_ignored(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run = [f"run_dir={run_dir}", "checkpoint.interval=1", "checkpoint.keep_last=2",
           "train.steps=4", *corpus(tmp_path)]
    run_ranks(train_rank_fn, 1, run)
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000003", "step00000004"]
    assert (ckpt / "latest").read_text() == "step00000004"
    # A save that died before `latest` was updated: its folder must not be resumed from.
    (ckpt / "step00000009").mkdir()
    (ckpt / "step00000004_mine").mkdir()  # a user's folder: neither a tag nor deleted
    from mhla_dist.train import find_resume

    with caplog.at_level("WARNING"):
        assert find_resume(ckpt, "auto") == ckpt / "step00000004"
        # an explicit older folder is used as given, with a pointer to the newer one
        assert find_resume(ckpt, str(ckpt / "step00000003")) == ckpt / "step00000003"
    assert "newer than latest" in caplog.text and "step00000004_mine" not in caplog.text
    assert "step00000003 (step 3) is older than this run's latest checkpoint" in caplog.text
    # two more steps: keep-last removes old checkpoints, never the user's folder
    (ckpt / "step00000009").rmdir()
    run_ranks(train_rank_fn, 1, run[:3] + ["train.steps=6"] + run[4:])
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "step00000004_mine", "step00000005", "step00000006"]
    (ckpt / "step00000009").mkdir()
    (ckpt / "latest").unlink()
    assert find_resume(ckpt, "auto") is None
    assert "no completed 'latest' entry" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint folder"):
        find_resume(ckpt, str(ckpt / "step00000009"))


def test_reaching_a_saved_step_again_replaces_its_folder_whole(tmp_path, caplog):
    """Resumed from step 1 of a run that went to step 2, at another layout (CP = 2): the
    new step-2 checkpoint does not mix with the old one's files (the old folder is moved
    aside, not written into or deleted), and it resumes."""
    data = corpus(tmp_path)
    run = [f"run_dir={tmp_path / 'run'}", "checkpoint.interval=1", "checkpoint.keep_last=5",
           "zero.stage=2", *data]
    run_ranks(train_rank_fn, 1, run + ["train.steps=2"])
    ckpt = tmp_path / "run" / "checkpoints"
    old_files = sorted(p.name for p in (ckpt / "step00000002").iterdir())
    run_ranks(train_rank_fn, 2, run + ["train.steps=2", "parallel.cp=2",
                                       "init.optimizer=reset",
                                       f"resume={ckpt / 'step00000001'}"])
    new_files = sorted(p.name for p in (ckpt / "step00000002").iterdir())
    assert sorted(p.name for p in (ckpt / "step00000002.replaced-1").iterdir()) == old_files
    assert len([f for f in new_files if f.endswith("optim_states.pt")]) == 2  # DP x CP = 2
    assert len([f for f in old_files if f.endswith("optim_states.pt")]) == 1
    assert not list(ckpt.glob(".*.saving"))
    run_ranks(train_rank_fn, 2, run + ["train.steps=3", "parallel.cp=2"])  # resumes


def _nan_on_rank1_at_step3(trainer):
    import torch.distributed as dist

    loss = trainer.task.loss

    def patched(engine, batch):
        total, count = loss(engine, batch)
        if dist.get_rank() == 1 and trainer.step == 2:  # the third step
            total = total * float("nan")
        return total, count

    trainer.task.loss = patched


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    run = [f"run_dir={tmp_path / 'run'}", "parallel.cp=2", "train.steps=5", *corpus(tmp_path)]
    r0, r1 = run_ranks(train_rank_fn, 2, run, _nan_on_rank1_at_step3)
    rows = r0["rows"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert all(torch.isfinite(p).all() for p in r0["params"].values())


def _always_nan(trainer):
    loss = trainer.task.loss

    def patched(engine, batch):
        total, count = loss(engine, batch)
        return total * float("nan"), count

    trainer.task.loss = patched


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    run = [f"run_dir={tmp_path / 'run'}", "train.steps=5", "train.max_nonfinite_steps=2",
           *corpus(tmp_path)]
    with pytest.raises(AssertionError, match=r"2 steps in a row had a non-finite loss"):
        run_ranks(train_rank_fn, 1, run, _always_nan)
