"""Exact resume: after `load_state_dict` the next batches equal an uninterrupted run's
(0 and 2 workers, across epoch boundaries); a DP-size change keeps the global count."""

import json
import logging

import pytest
import torch

from mhla_dist.data import lm_loader, video_loader
from tests.data.fixtures import documents, take, write_clips, write_docs


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            for k in x) for x, y in zip(a, b, strict=True))


def _make(kind, pattern, num_workers):
    if kind == "lm":
        return lm_loader(pattern, seq_len=16, batch_size=3, num_workers=num_workers, seed=11,
                         shuffle_buffer=8)
    return video_loader(pattern, batch_size=3, num_workers=num_workers, seed=11,
                        shuffle_buffer=8, clip_shape=(2, 4, 4, 3))


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("kind", ["lm", "video"])
def test_resume_gives_the_same_next_batches(tmp_path, kind, num_workers):
    if kind == "lm":
        pattern = write_docs(tmp_path, documents(24), per_shard=3)  # ~17 batches per epoch
    else:
        pattern = write_clips(tmp_path, 25, per_shard=3)  # ~10 batches per epoch
    total, cut = 30, 13  # spans more than one epoch
    reference = take(_make(kind, pattern, num_workers), total)

    first = _make(kind, pattern, num_workers)
    head = take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # plain types: fits any checkpoint
    assert state["stats"]["batches"] == cut

    resumed = _make(kind, pattern, num_workers)
    resumed.load_state_dict(state)
    tail = take(resumed, total - cut)
    assert _equal(head, reference[:cut])
    assert _equal(tail, reference[cut:])
    assert resumed.stats.batches == total


def test_resume_twice_and_reiterate(tmp_path):
    pattern = write_clips(tmp_path, 20, per_shard=2)
    reference = take(_make("video", pattern, 0), 20)
    loader = _make("video", pattern, 0)
    got = take(loader, 5) + take(loader, 5)  # a new iter() continues where the last stopped
    again = _make("video", pattern, 0)
    again.load_state_dict(loader.state_dict())
    got += take(again, 10)
    assert _equal(got, reference)


def test_dp_size_change_keeps_the_global_sample_count(tmp_path, caplog):
    pattern = write_clips(tmp_path, 48, per_shard=2)  # 24 shards
    old = [video_loader(pattern, batch_size=2, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    for loader in old:
        take(loader, 4)  # 2 ranks x 4 batches x 2 clips = 16 clips of epoch 0
    new = video_loader(pattern, batch_size=2, dp_rank=0, dp_size=4, num_workers=0, seed=1)
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(old[0].state_dict())
    assert "layout changed" in caplog.text
    assert new.positions[0].epoch == 0 and new.positions[0].index == 2  # 16 / 4 ranks / 2
    keys = [k for b in take(new, 4) for k in b["keys"]]  # 12 clips are left on this rank
    assert len(keys) == 8 and len(set(keys)) == 8


def test_state_of_another_rank_is_refused(tmp_path):
    pattern = write_clips(tmp_path, 8, per_shard=2)
    a = video_loader(pattern, batch_size=2, dp_rank=0, dp_size=2)
    b = video_loader(pattern, batch_size=2, dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank 0 loaded on dp_rank 1"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("cut", [3, 7, 9])
def test_resume_in_finite_mode_with_uneven_workers(tmp_path, cut):
    pattern = write_clips(tmp_path, 22, per_shard=2)  # 11 shards: 6 and 5 batches a worker
    def make():
        return video_loader(pattern, batch_size=2, num_workers=2, num_epochs=2, seed=4)

    reference = list(make())
    first = make()
    head = take(first, cut)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert _equal(head + list(resumed), reference)
