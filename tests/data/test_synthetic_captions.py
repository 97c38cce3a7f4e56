"""Caption embeddings in the synthetic video shards: `write_synthetic_video(caption_dim=)`,
`synthetic_caption` and the `--caption-dim` flag of `tools/make_synthetic_video.py`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mhla_dist.data import video_loader, write_synthetic_video
from mhla_dist.data.synthetic_video import SHAPES, class_prototype, synthetic_caption

REPO = Path(__file__).resolve().parents[2]


def read_samples(folder: Path) -> list[dict]:
    pattern = json.loads((folder / "clips.json").read_text())["pattern"]
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False).decode())


def write(folder: Path, **kw) -> list[dict]:
    write_synthetic_video(folder, num_clips=12, frames=3, size=16, clips_per_shard=5, **kw)
    return read_samples(folder)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_captions_leave_clips_unchanged(tmp_path):
    plain = write(tmp_path / "plain", seed=3)
    captioned = write(tmp_path / "captioned", seed=3, caption_dim=16)
    assert [s["__key__"] for s in plain] == [s["__key__"] for s in captioned]
    for a, b in zip(plain, captioned, strict=True):
        np.testing.assert_array_equal(a["clip.npy"], b["clip.npy"])
        assert a["cls"] == b["cls"]
        assert "emb.npy" not in a
        assert b["emb.npy"].dtype == np.float32 and b["emb.npy"].shape == (16,)
    meta = json.loads((tmp_path / "captioned" / "clips.json").read_text())
    assert meta["caption_dim"] == 16 and meta["caption_seed"] == 3
    assert json.loads((tmp_path / "plain" / "clips.json").read_text())["caption_dim"] == 0


def test_captions_cluster_by_class(tmp_path):
    samples = write_synthetic_video(tmp_path, num_clips=40, frames=2, size=16,
                                    caption_dim=32, seed=1)
    rows = read_samples(tmp_path)
    assert samples.samples == 40
    labels = np.array([s["cls"] for s in rows])
    assert len(set(labels.tolist())) == len(SHAPES)  # every class present: the check bites
    caps = np.stack([s["emb.npy"] for s in rows])
    same, other = [], []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            (same if labels[i] == labels[j] else other).append(cosine(caps[i], caps[j]))
    # 0.1 noise per dim on a unit vector in 32 dims: |noise| ~ 0.57, cos ~ 0.75 within a
    # class; independent random prototypes are ~ 0 +- 0.18 apart.
    assert min(same) > 0.5, min(same)
    assert max(other) < 0.6, max(other)
    assert np.mean(same) - np.mean(other) > 0.6
    for label in range(len(SHAPES)):  # each clip's caption is near its own prototype
        proto = class_prototype(label, 32, seed=1)
        assert np.isclose(np.linalg.norm(proto), 1.0)
        assert min(cosine(c, proto) for c in caps[labels == label]) > 0.7


def test_caption_seed_changes_captions_not_clips(tmp_path):
    a = write(tmp_path / "a", seed=5, caption_dim=8)
    b = write(tmp_path / "b", seed=5, caption_dim=8, caption_seed=6)
    again = write(tmp_path / "again", seed=5, caption_dim=8, caption_seed=5)
    for x, y, z in zip(a, b, again, strict=True):
        np.testing.assert_array_equal(x["clip.npy"], y["clip.npy"])
        assert not np.allclose(x["emb.npy"], y["emb.npy"])
        np.testing.assert_array_equal(x["emb.npy"], z["emb.npy"])  # default = seed
    assert json.loads((tmp_path / "b" / "clips.json").read_text())["caption_seed"] == 6
    for i, x in enumerate(a):  # what the shards hold is `synthetic_caption` of the clip
        np.testing.assert_array_equal(x["emb.npy"], synthetic_caption(i, x["cls"], 8, seed=5))


def test_bad_caption_dim(tmp_path):
    with pytest.raises(ValueError, match=r"caption_dim=-1 must be an integer >= 0"):
        write_synthetic_video(tmp_path, num_clips=1, frames=1, size=8, caption_dim=-1)


def test_video_loader_yields_captions(tmp_path):
    write(tmp_path, caption_dim=8)
    batches = list(video_loader(str(tmp_path / "clips-{000000..000002}.tar"), batch_size=4,
                                with_caption=True, shuffle=False, num_epochs=1))
    assert [b["clip"].shape[0] for b in batches] == [4, 4, 4]
    by_key = {s["__key__"]: s["emb.npy"] for s in read_samples(tmp_path)}
    for b in batches:
        assert b["caption"].dtype == torch.float32 and tuple(b["caption"].shape) == (4, 8)
        for key, cap in zip(b["keys"], b["caption"], strict=True):
            np.testing.assert_array_equal(cap.numpy(), by_key[key])


def test_make_synthetic_video_caption_dim_flag(tmp_path):
    out = tmp_path / "shapes"
    proc = subprocess.run(
        [sys.executable, "tools/make_synthetic_video.py", "--output", str(out), "--num-clips",
         "6", "--frames", "2", "--size", "16", "--caption-dim", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "clips: 6" in proc.stdout and "captions: [8]" in proc.stdout
    rows = read_samples(out)
    assert len(rows) == 6 and all(r["emb.npy"].shape == (8,) for r in rows)
    assert json.loads((out / "clips.json").read_text())["caption_dim"] == 8
