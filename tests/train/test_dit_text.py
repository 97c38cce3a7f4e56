"""Caption tokens (`model.text_dim`, cross-attention) reach the DiT in training: the Wan
preset and the DiT arch, through the commands a user types (synthetic clips with caption
tokens, torchrun with 2 processes, CP = 2, ZeRO-2, bf16, gradient accumulation), and the
loader pads and masks them as the config asks."""

import json
import subprocess

import numpy as np
import pytest
import torch

from tests.train.launching import ROOT, launch_env, torchrun_command


def _clips(path, text_tokens=16, caption_dim=32, seed=0):
    from mhla_dist.data import write_synthetic_video

    write_synthetic_video(path, num_clips=16, frames=8, size=16, clips_per_shard=8,
                          caption_dim=caption_dim, caption_seed=seed, text_tokens=text_tokens)
    return f"{path}/clips-{{000000..000001}}.tar"


def test_torchrun_wan_cp2_bf16_trains_on_caption_tokens(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.train={_clips(tmp_path / 'clips')}", "data.kind=video",
                 "data.micro_batch_size=2", "data.shuffle_buffer=8", "parallel.cp=2",
                 "zero.stage=2", "train.precision=bf16", "train.grad_accum=2",
                 "train.steps=3", "logging.interval=1", "logging.wandb.mode=disabled",
                 f"run_dir={run_dir}"]
    proc = subprocess.run(torchrun_command("configs/dit/wan-tiny.yaml", overrides), cwd=ROOT,
                          env=launch_env(2), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stderr + proc.stdout)[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] < 10 for r in rows)
    assert "arch: wan" in (run_dir / "config.yaml").read_text()


def test_loader_pads_and_masks_caption_tokens(tmp_path):
    from mhla_dist.data import video_loader
    from mhla_dist.data.synthetic_video import synthetic_text

    urls = _clips(tmp_path / "clips", text_tokens=6, caption_dim=4)
    common = dict(batch_size=4, with_label=True, shuffle=False, num_epochs=1)
    masked = next(iter(video_loader(urls, text_shape=(6, 4), **common)))
    full = next(iter(video_loader(urls, text_shape=(6, 4), pad_text_to_len=True, **common)))
    lengths = [len(synthetic_text(i, int(label), 4, 6)) for i, label in
               enumerate(masked["label"])]
    assert masked["text"].shape == (4, max(lengths), 4) and "text_mask" not in full
    assert masked["text_mask"].sum(1).tolist() == lengths
    assert full["text"].shape == (4, 6, 4)
    for i, n in enumerate(lengths):
        expect = torch.from_numpy(synthetic_text(i, int(masked["label"][i]), 4, 6))
        assert torch.equal(masked["text"][i, :n], expect) and not masked["text"][i, n:].any()
        assert torch.equal(full["text"][i, :n], expect) and not full["text"][i, n:].any()
    # captions longer than text_len, or of another width, are bad samples, not truncated
    from mhla_dist.data.video import check_text_tokens

    for tokens, text_len, dim, message in ((np.zeros((7, 4)), 6, 4, "at most text_len=6"),
                                           (np.zeros((3, 5)), 6, 4, r"\[L, 4\]"),
                                           (np.zeros(4), 6, 4, r"\[L, 4\]")):
        with pytest.raises(ValueError, match=message):
            check_text_tokens(tokens, text_len, dim)
