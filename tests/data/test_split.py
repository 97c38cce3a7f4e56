"""Across DP ranks an epoch covers every sample exactly once; TP/CP ranks of one DP
replica see identical batches; CP ranks keep contiguous slices."""

import collections

import numpy as np
import pytest
import torch

from mhla_dist.data import EOS_ID, cp_slice, epoch_shards, lm_loader, shift_tokens, video_loader
from tests.data.fixtures import documents, take, write_clips, write_docs


@pytest.mark.parametrize("dp_size,num_workers", [(1, 0), (3, 0), (2, 2), (3, 2)],
                         ids=lambda v: str(v))
def test_video_epoch_covers_every_clip_once(tmp_path, dp_size, num_workers):
    pattern = write_clips(tmp_path, 40, per_shard=3)  # 14 shards, the last one short
    keys = []
    for rank in range(dp_size):
        loader = video_loader(pattern, batch_size=4, dp_rank=rank, dp_size=dp_size,
                              num_workers=num_workers, num_epochs=1, seed=3)
        keys += [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == [f"clip{i:09d}" for i in range(40)]


def test_epoch_shards_partition_every_epoch():
    urls = [f"s{i}" for i in range(23)]
    for epoch in range(3):
        got = [s for r in range(4) for w in range(3)
               for s in epoch_shards(urls, seed=7, epoch=epoch, dp_rank=r, dp_size=4,
                                     worker=w, num_workers=3)]
        assert sorted(got) == sorted(urls)
    orders = {tuple(epoch_shards(urls, seed=7, epoch=e, dp_rank=0, dp_size=1)) for e in range(3)}
    assert len(orders) == 3  # reshuffled every epoch, deterministically
    assert epoch_shards(urls, seed=7, epoch=1, dp_rank=0, dp_size=1) == \
        epoch_shards(urls, seed=7, epoch=1, dp_rank=0, dp_size=1)


def _stream(batches):
    """Undo the packing of one worker's epoch: windows overlap by one token."""
    toks, ids = [], []
    for b in batches:
        for t, d in zip(b["tokens"].numpy(), b["doc_ids"].numpy(), strict=True):
            start = 0 if not toks else 1
            keep = d >= 0
            toks += list(t[keep][start:])
            ids += list(d[keep][start:])
    return np.array(toks), np.array(ids)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_lm_epoch_covers_every_token_once(tmp_path, dp_size):
    docs = documents(30)
    pattern = write_docs(tmp_path, docs, per_shard=4)
    seen = collections.defaultdict(list)
    for rank in range(dp_size):
        batches = list(lm_loader(pattern, seq_len=16, batch_size=3, dp_rank=rank,
                                 dp_size=dp_size, num_epochs=1, seed=1))
        toks, ids = _stream(batches)
        for doc_id in np.unique(ids):
            seen[int(doc_id)].append(toks[ids == doc_id])
    assert sorted(seen) == list(range(30))
    for i, d in enumerate(docs):
        (got,) = seen[i]  # exactly one rank read document i
        np.testing.assert_array_equal(got, np.append(d, EOS_ID))


def test_tp_and_cp_ranks_get_identical_batches(tmp_path):
    pattern = write_docs(tmp_path, documents(40), per_shard=5)

    def make():  # what every TP/CP rank of DP replica 1 builds
        return lm_loader(pattern, seq_len=16, batch_size=2, dp_rank=1, dp_size=2, seed=5)

    a, b = take(make(), 12), take(make(), 12)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["doc_ids"], y["doc_ids"])
    other = take(lm_loader(pattern, seq_len=16, batch_size=2, dp_rank=0, dp_size=2, seed=5), 1)
    assert not torch.equal(other[0]["tokens"], a[0]["tokens"])

    full = shift_tokens(a[0])
    parts = [cp_slice(a[0], r, 4) for r in range(4)]
    for key in ("input_ids", "labels", "doc_ids"):
        assert all(p[key].shape == (2, 4) for p in parts)
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), full[key])


def test_too_few_shards_for_dp_size(tmp_path):
    pattern = write_clips(tmp_path, 4, per_shard=2)
    with pytest.raises(ValueError, match="2 shard.*dp_size=3"):
        video_loader(pattern, batch_size=1, dp_size=3)
