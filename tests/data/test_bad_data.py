"""Corrupt samples and unreadable shards are skipped, counted and logged with shard and
key; data that is all bad stops with a clear error."""

import io
import logging
import tarfile

import numpy as np
import pytest

from mhla_dist.data import NoValidDataError, expand_urls, video_loader
from tests.data.fixtures import take, write_clips


def _corrupt_member(shard: str, member: str, data: bytes) -> None:
    """Rewrite `shard` with `member`'s content replaced."""
    with tarfile.open(shard) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, payload in items:
            payload = data if m.name == member else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_corrupt_sample_is_skipped_counted_and_logged(tmp_path, caplog):
    shards = expand_urls(write_clips(tmp_path, 12, per_shard=4))
    _corrupt_member(shards[1], "clip000000005.clip.npy", b"\x93NUMPY garbage")
    loader = video_loader(shards, batch_size=4, num_epochs=1, shuffle=False)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 11 and "clip000000005" not in keys
    assert loader.stats.skipped_samples == 1 and loader.stats.bad_shards == 0
    (event,) = loader.stats.recent
    assert event.shard == shards[1] and event.key == "clip000000005"
    assert "clip000000005" in caplog.text and shards[1] in caplog.text


def test_wrong_shape_and_missing_label_are_bad_samples(tmp_path):
    shards = expand_urls(write_clips(tmp_path, 6, per_shard=6))
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4, 4, 3), np.uint8))
    _corrupt_member(shards[0], "clip000000002.clip.npy", buf.getvalue())
    _corrupt_member(shards[0], "clip000000004.cls", b"not a number")
    loader = video_loader(shards, batch_size=6, num_epochs=1, clip_shape=(2, 4, 4, 3))
    (batch,) = list(loader)
    assert len(batch["keys"]) == 4 and loader.stats.skipped_samples == 2


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
def test_truncated_and_missing_shards_are_skipped_and_counted(tmp_path, num_workers):
    shards = expand_urls(write_clips(tmp_path, 16, per_shard=4))
    data = open(shards[2], "rb").read()
    open(shards[2], "wb").write(data[: len(data) // 2 + 100])  # cut inside a member
    shards.append(str(tmp_path / "missing-shard.tar"))
    loader = video_loader(shards, batch_size=2, num_epochs=1, num_workers=num_workers)
    keys = [k for b in loader for k in b["keys"]]
    assert 12 <= len(keys) < 16 and len(set(keys)) == len(keys)
    assert {f"clip{i:09d}" for i in range(8)} | {f"clip{i:09d}" for i in range(12, 16)} \
        <= set(keys)
    assert loader.stats.bad_shards == 2
    assert {e.shard for e in loader.stats.recent} == {shards[2], shards[-1]}


def test_resume_does_not_count_bad_data_twice(tmp_path):
    shards = expand_urls(write_clips(tmp_path, 12, per_shard=4))
    _corrupt_member(shards[0], "clip000000001.clip.npy", b"junk")
    first = video_loader(shards, batch_size=2, num_epochs=1, shuffle=False)
    take(first, 3)
    assert first.stats.skipped_samples == 1
    resumed = video_loader(shards, batch_size=2, num_epochs=1, shuffle=False)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(rest) == 3 and resumed.stats.skipped_samples == 1


def test_all_bad_data_raises_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"this is not a tar file" * 50)
    loader = video_loader(str(tmp_path / "bad-{0..1}.tar"), batch_size=2)
    with pytest.raises(NoValidDataError, match="no valid sample in 2 shard.*bad-0.tar"):
        next(iter(loader))
    assert loader.stats.bad_shards == 0  # the error came before any batch was handed out


def test_all_bad_data_raises_from_workers_too(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"\0" * 10)
    loader = video_loader(str(tmp_path / "bad-{0..1}.tar"), batch_size=2, num_workers=2)
    with pytest.raises(Exception, match="no valid sample"):
        next(iter(loader))
