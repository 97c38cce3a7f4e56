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
