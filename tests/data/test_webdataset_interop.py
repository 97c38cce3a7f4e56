"""Our shards read by webdataset's `WebDataset`; `ShardWriter` shards read by our loaders;
URL forms (brace lists, folders, `::`, `pipe:`)."""

import numpy as np
import webdataset as wds

from mhla_dist.data import expand_urls, lm_loader, read_shard, video_loader
from tests.data.fixtures import documents, write_clips, write_docs


def test_our_token_shards_read_by_webdataset(tmp_path):
    docs = documents(10)
    pattern = write_docs(tmp_path, docs, per_shard=4)
    got = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in got] == [f"doc{i:09d}" for i in range(10)]
    for i, s in enumerate(got):
        np.testing.assert_array_equal(s["tokens.npy"], docs[i])
        assert s["tokens.npy"].dtype == np.uint16
        assert s["json"]["doc_id"] == i


def test_our_clip_shards_read_by_webdataset(tmp_path):
    pattern = write_clips(tmp_path, 5, per_shard=2)
    got = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False).decode())
    assert [int(s["cls"]) for s in got] == [i % 7 for i in range(5)]
    assert got[3]["clip.npy"].shape == (2, 4, 4, 3) and int(got[3]["clip.npy"][0, 0, 0, 0]) == 3


def test_shardwriter_shards_read_by_our_loaders(tmp_path):
    docs = documents(12)
    with wds.ShardWriter(str(tmp_path / "w-%04d.tar"), maxcount=5, verbose=0) as w:
        for i, d in enumerate(docs):
            w.write({"__key__": f"sample{i}", "npy": d.astype(np.uint32), "json": {"doc_id": i}})
    loader = lm_loader(str(tmp_path / "w-{0000..0002}.tar"), seq_len=1000, batch_size=1,
                       shuffle=False, num_epochs=1, eos_id=None)
    (batch,) = list(loader)
    n = sum(len(d) for d in docs)
    np.testing.assert_array_equal(batch["tokens"][0, :n].numpy(), np.concatenate(docs))
    assert (batch["doc_ids"][0, n:] == -1).all()

    with wds.ShardWriter(str(tmp_path / "v-%04d.tar"), maxcount=3, verbose=0) as w:
        for i in range(7):
            w.write({"__key__": f"c{i}", "npy": np.full((2, 3, 3, 1), i, np.uint8), "cls": i})
    batches = list(video_loader(str(tmp_path / "v-{0000..0002}.tar"), batch_size=7,
                                shuffle=False, num_epochs=1))
    assert batches[0]["label"].tolist() == list(range(7))
    assert batches[0]["clip"].shape == (7, 2, 3, 3, 1)


def test_url_forms(tmp_path):
    pattern = write_clips(tmp_path / "a", 6, per_shard=2)
    shards = expand_urls(pattern)
    assert len(shards) == 3 and shards == sorted(shards)
    assert expand_urls(str(tmp_path / "a")) == shards
    assert expand_urls("::".join(shards[:2])) == shards[:2]
    events = []
    direct = [k for k, _ in read_shard(shards[0], events)]
    piped = [k for k, _ in read_shard(f"pipe:cat {shards[0]}", events)]
    assert direct == piped == ["clip000000000", "clip000000001"] and not events
    loader = video_loader([f"pipe:cat {s}" for s in shards], batch_size=6, shuffle=False,
                          num_epochs=1)
    assert next(iter(loader))["label"].tolist() == [0, 1, 2, 3, 4, 5]
