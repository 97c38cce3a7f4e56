"""Checkpoint integrity and failed saves.

- A checkpoint's manifest (every file's size and sha256) is written before `latest`
  moves. A flipped byte or a truncated shard: resume=PATH fails naming the file, and
  resume=auto falls back to the newest checkpoint that verifies, saying what it skipped.
- A save that raises on one rank (an injected OSError, as from a full disk) stops the
  run with the error on every rank; `latest` stays where it was, nothing of the failed
  step's folder is left, and the next run resumes from the last good checkpoint.
"""

import json
import logging

import pytest

from mhla_dist.train import find_resume
from mhla_dist.train.integrity import MANIFEST, CheckpointCorruptError
from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, train_rank_fn


def _steps(run_dir) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run(tmp_path):
    """A 1-process run to step 4 with checkpoints at 2 and 4."""
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "checkpoint.interval=2", "checkpoint.keep_last=5",
                 *corpus(tmp_path)]
    run_ranks(train_rank_fn, 1, [*overrides, "train.steps=4"])
    return run_dir, overrides


def _a_shard(folder):
    return sorted(folder.glob("*model_states.pt"))[0]


def test_a_flipped_byte_is_caught_and_auto_falls_back(run, caplog):
    run_dir, overrides = run
    ckpt = run_dir / "checkpoints"
    manifest = json.loads((ckpt / "step00000004" / MANIFEST).read_text())["files"]
    assert "trainer_state/rank00000.pt" in manifest and "config.yaml" in manifest
    shard = _a_shard(ckpt / "step00000004")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=f"{shard.name} does not match its sha256"):
        find_resume(ckpt, str(ckpt / "step00000004"))
    with caplog.at_level(logging.WARNING, logger="mhla_dist.train"):
        assert find_resume(ckpt, "auto") == ckpt / "step00000002"
    assert "the newest checkpoint that verifies; skipped" in caplog.text
    assert shard.name in caplog.text
    # the run itself resumes from step 2 and goes on
    run_ranks(train_rank_fn, 1, [*overrides, "train.steps=5"])
    assert _steps(run_dir) == [1, 2, 3, 4, 3, 4, 5]


def test_a_truncated_shard_is_named(run):
    run_dir, _ = run
    ckpt = run_dir / "checkpoints"
    shard = _a_shard(ckpt / "step00000002")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=r"has 100 bytes, the manifest says \d+"):
        find_resume(ckpt, str(ckpt / "step00000002"))
    _a_shard(ckpt / "step00000004").unlink()  # and the newest is missing a file: none left
    with pytest.raises(CheckpointCorruptError, match="no checkpoint in .* can be resumed"):
        find_resume(ckpt, "auto")


def test_a_failed_save_on_one_rank_keeps_latest_and_leaves_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "parallel.cp=2", "checkpoint.interval=2",
                 "train.steps=6", *corpus(tmp_path)]
    monkeypatch.setenv("MHLA_FAULT", "save_error@1:4")
    with pytest.raises(AssertionError, match=r"saving the step-4 checkpoint failed on rank\(s\) "
                                             r"\[1\].*'latest' still names step00000002"):
        run_ranks(train_rank_fn, 2, overrides)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000002"]
    monkeypatch.delenv("MHLA_FAULT")
    run_ranks(train_rank_fn, 2, overrides)  # resumes from step 2
    assert _steps(run_dir)[-4:] == [3, 4, 5, 6]
    assert (ckpt / "latest").read_text() == "step00000006"
