"""The data preparation CLIs, run in-process through their `main(argv)`."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from mhla_dist.data import ByteTokenizer, lm_loader, video_loader
from tools import make_synthetic_video, prepare_text, prepare_video


def test_prepare_text_from_files_and_folders(tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first document")
    (tmp_path / "in" / "sub" / "b.md").write_text("second\n\nthird paragraph")
    (tmp_path / "c.jsonl").write_text('{"text": "from jsonl"}\n{"text": "again"}\n')
    out = tmp_path / "out"
    rc = prepare_text.main(["--input", str(tmp_path / "in"), str(tmp_path / "c.jsonl"),
                            "--output", str(out), "--shard-size", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "documents: 4" in printed and "shards: 2" in printed
    index = json.loads((out / "shard.json").read_text())
    assert index["samples"] == 4 and index["vocab_size"] == 257
    texts = [ByteTokenizer().decode(s["tokens.npy"])
             for s in wds.WebDataset(index["pattern"], shardshuffle=False).decode()]
    assert texts == ["first document", "second\n\nthird paragraph", "from jsonl", "again"]
    batches = list(lm_loader(index["pattern"], seq_len=8, batch_size=4, num_epochs=1))
    assert sum(int((b["doc_ids"] >= 0).sum()) for b in batches) >= 40


def test_prepare_text_with_a_tokenizer_json(tmp_path, capsys):
    from tests.data.test_packing import write_word_tokenizer

    write_word_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in.txt").write_text("the for statement loops over items .")
    out = tmp_path / "out"
    assert prepare_text.main(["--input", str(tmp_path / "in.txt"), "--output", str(out),
                              "--tokenizer", str(tmp_path / "tokenizer.json"), "--quiet"]) == 0
    assert json.loads((out / "shard.json").read_text())["vocab_size"] == 9
    batch = next(iter(lm_loader(str(out), seq_len=7, batch_size=1, shuffle=False,
                                eos_id=1, num_epochs=1)))
    assert batch["tokens"][0].tolist() == [2, 3, 4, 5, 6, 7, 8, 1]


def test_prepare_text_help_and_missing_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_text.main(["--help"])
    assert exc.value.code == 0 and "--tokenizer" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_text.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path)])


def test_make_synthetic_video(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert make_synthetic_video.main(["--output", str(out), "--num-clips", "10", "--frames",
                                      "3", "--size", "16", "--shard-size", "4"]) == 0
    assert "clips: 10  shards: 3" in capsys.readouterr().out
    index = json.loads((out / "clips.json").read_text())
    (batch,) = list(video_loader(index["pattern"], batch_size=10, num_epochs=1,
                                 clip_shape=(3, 16, 16, 3)))
    assert batch["clip"].dtype.is_floating_point is False and batch["label"].max() < 4
    assert len(set(batch["label"].tolist())) > 1


def test_prepare_video_from_npy_and_frame_folders(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "dogs" / "clip0").mkdir(parents=True)
    np.save(src / "cats" / "c0.npy", np.random.default_rng(0).integers(0, 255, (5, 20, 30, 3),
                                                                       dtype=np.uint8))
    np.save(src / "cats" / "c1.npy", np.random.default_rng(1).random((2, 12, 12, 3)))
    for f in range(4):
        Image.fromarray(np.full((10, 14, 3), 40 * f, np.uint8)).save(
            src / "dogs" / "clip0" / f"{f:03d}.png")
    out = tmp_path / "out"
    rc = prepare_video.main(["--input", str(src), "--output", str(out), "--frames", "3",
                             "--size", "8", "--label-from-parent", "--quiet"])
    assert rc == 0 and "clips: 3" in capsys.readouterr().out
    index = json.loads((out / "clips.json").read_text())
    assert index["classes"] == ["cats", "dogs"]
    (batch,) = list(video_loader(index["pattern"], batch_size=3, num_epochs=1, shuffle=False,
                                 clip_shape=(3, 8, 8, 3)))
    assert batch["clip"].dtype == torch.uint8 and batch["label"].tolist() == [0, 0, 1]
    frames = batch["clip"][2]  # the PNG clip: frames 0, 2, 3 of 4 (evenly spaced)
    assert frames[:, 4, 4, 0].tolist() == [0, 80, 120]


# --- prepare_video.py --vae (issue #18): latents from a tiny random VAE saved by the test ---


def test_prepare_video_with_a_vae(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from mhla_dist.data import load_vae
    from mhla_dist.train.dit_task import to_model_layout
    from tests.data.test_vae import save_tiny_vae

    vae_dir = save_tiny_vae(tmp_path / "vae", "wan")
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.save(src / "a.npy", rng.integers(0, 255, (7, 20, 24, 3), dtype=np.uint8))
    np.save(src / "b.npy", rng.random((9, 16, 16)))  # grey floats in [0, 1]
    np.save(src / "c.npy", rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8))
    common = ["--input", str(src), "--frames", "5", "--size", "16", "--quiet"]
    assert prepare_video.main([*common, "--output", str(tmp_path / "px")]) == 0
    capsys.readouterr()
    assert prepare_video.main([*common, "--output", str(tmp_path / "z"), "--vae", str(vae_dir),
                               "--vae-batch", "2"]) == 0
    assert "[4, 3, 8, 8] latents (model.in_channels=4 frames=3 height=8 width=8)" in \
        capsys.readouterr().out
    index = json.loads((tmp_path / "z" / "clips.json").read_text())
    assert index["clip_shape"] == [4, 3, 8, 8] and index["vae"]["kind"] == "wan"

    def read(out):  # webdataset's own reader: the stored arrays, in order
        pattern = json.loads((out / "clips.json").read_text())["pattern"]
        return [s["clip.npy"] for s in wds.WebDataset(pattern, shardshuffle=False).decode()]

    pixels, stored = read(tmp_path / "px"), read(tmp_path / "z")
    assert [z.dtype for z in stored] == [np.float32] * 3
    vae = load_vae(vae_dir)
    for frames, latent in zip(pixels, stored, strict=True):
        x = torch.from_numpy(frames).float() / 127.5 - 1  # [F, H, W, C], C = 3 or 1 (grey)
        x = x.permute(3, 0, 1, 2).expand(3, -1, -1, -1)[None]
        ref = vae.encode(x)[0]
        assert float((torch.from_numpy(latent) - ref).norm() / ref.norm()) < 1e-5
    (batch,) = list(video_loader(index["pattern"], batch_size=3, num_epochs=1, shuffle=False,
                                 with_label=False, clip_shape=(4, 3, 8, 8)))
    assert to_model_layout(batch["clip"], (4, 3, 8, 8)).shape == (3, 4, 3, 8, 8)

    with pytest.raises(SystemExit) as exc:  # checked against the VAE before encoding
        prepare_video.main([*common, "--frames", "6", "--output", str(tmp_path / "bad"),
                            "--vae", str(vae_dir)])
    assert exc.value.code == 2 and "nearest 5 or 9" in capsys.readouterr().err


def _shape_widths(pattern: str, shape: tuple) -> list[int]:
    """The width in pixels of each clip's shape in its first frame (bright pixels: the
    background is below 24, a shape's colour 120 or more)."""
    (batch,) = list(video_loader(pattern, batch_size=64, num_epochs=1, clip_shape=shape))
    bright = (batch["clip"][:, 0].max(-1).values >= 100)  # [B, H, W]
    return [int(b.any(0).sum()) for b in bright]


def test_make_synthetic_video_radius(tmp_path, capsys):
    """--radius sets the shapes' size (recorded in clips.json); bad ranges are named."""
    widths = {}
    for name, radius in (("default", []), ("big", ["--radius", "0.3", "0.3"])):
        out = tmp_path / name
        assert make_synthetic_video.main(["--output", str(out), "--num-clips", "64",
                                          "--frames", "2", "--size", "32", *radius]) == 0
        index = json.loads((out / "clips.json").read_text())
        widths[name] = _shape_widths(index["pattern"], (2, 32, 32, 3))
    assert index["radius"] == [0.3, 0.3]
    # Default radii are 0.12-0.22 x 32 = 3.8-7 pixels, 0.3 x 32 = 9.6: a shape is at most
    # 2r + 1 wide, and a square, disc or ring at least 2r - 1 (triangles are narrower).
    assert max(widths["default"]) <= 2 * 7.04 + 1
    assert min(widths["big"]) >= 2 * 9.6 * 0.5 and max(widths["big"]) <= 2 * 9.6 + 1
    assert np.median(widths["big"]) > np.median(widths["default"]) + 4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        make_synthetic_video.main(["--output", str(tmp_path / "bad"), "--num-clips", "1",
                                   "--radius", "0.3", "0.6"])
    assert "--radius 0.3 0.6: radius=(0.3, 0.6) must be (min, max) fractions" in \
        capsys.readouterr().err
