"""Rolling back to an older checkpoint in the same run directory: the checkpoint `latest`
names is never deleted, the abandoned branch's later folders are retired first, and the
`.replaced-K` folders count against `keep_last` (before the fix, keep_last=1 after a
rollback deleted the new save and kept the abandoned one; `resume=auto` then started
from scratch)."""

import json
import logging

from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, train_rank_fn


def _folders(ckpt) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir())


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in
            (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rollback_keeps_its_own_saves_and_retires_the_abandoned_branch(tmp_path):
    run_dir, data = tmp_path / "run", corpus(tmp_path)
    ckpt = run_dir / "checkpoints"
    base = [f"run_dir={run_dir}", *data]
    run_ranks(train_rank_fn, 1, [*base, "train.steps=4", "checkpoint.interval=2",
                                 "checkpoint.keep_last=3"])
    assert _folders(ckpt) == ["step00000002", "step00000004"]
    run_ranks(train_rank_fn, 1, [*base, "train.steps=3", "checkpoint.interval=1",
                                 "checkpoint.keep_last=1", f"resume={ckpt / 'step00000002'}"])
    assert (ckpt / "latest").read_text() == "step00000003"
    assert _folders(ckpt) == ["step00000003"]
    # resume=auto continues from the rolled-back branch's newest checkpoint
    run_ranks(train_rank_fn, 1, [*base, "train.steps=5", "checkpoint.interval=1",
                                 "checkpoint.keep_last=1"])
    assert _steps(run_dir) == [1, 2, 3, 4, 3, 4, 5]
    assert _folders(ckpt) == ["step00000005"]


def test_replaced_folders_count_against_keep_last(tmp_path):
    run_dir, data = tmp_path / "run", corpus(tmp_path)
    ckpt = run_dir / "checkpoints"
    run = [f"run_dir={run_dir}", "train.steps=2", "checkpoint.interval=1",
           "checkpoint.keep_last=3", *data]
    run_ranks(train_rank_fn, 1, run)
    for _ in range(2):  # reach step 2 again twice, from step 1
        run_ranks(train_rank_fn, 1, [*run, f"resume={ckpt / 'step00000001'}"])
    assert _folders(ckpt) == ["step00000001", "step00000002", "step00000002.replaced-2"]


def test_prune_order_and_log(tmp_path, caplog):
    from mhla_dist.train.checkpoint import prune_checkpoints

    names = ["step00000010", "step00000015", "step00000020", "step00000020.replaced-1",
             "step00000005.replaced-1", "step00000015_mine", "notes"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "step00000001").write_text("a file, not a checkpoint folder")
    with caplog.at_level(logging.WARNING, logger="mhla_dist.train"):
        deleted = prune_checkpoints(tmp_path, "step00000015", 3)
    # kept: latest, then its branch's older steps, then the newest of what was left behind
    assert _folders(tmp_path) == ["notes", "step00000010", "step00000015",
                                  "step00000015_mine", "step00000020"]
    assert deleted == ["step00000020.replaced-1", "step00000005.replaced-1"]
    assert "deleting step00000020.replaced-1: left behind by a resume" in caplog.text
    assert (tmp_path / "step00000001").is_file()
    assert prune_checkpoints(tmp_path, "step00000015", 1) == ["step00000010", "step00000020"]
    assert "deleting step00000010" not in caplog.text  # the run's own older step: no warning
