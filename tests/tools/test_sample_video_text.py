"""tools/sample_video.py with caption tokens (a Wan-architecture run, padded Wan-style to
text_len) and with a VAE (latent samples decoded for the pictures), against the same
sampling and decoding done in this process."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tools.test_sample_video import cli, make_run, sample

WAN = ["model.arch=wan", "model.pos_embed=rope", "model.num_classes=0", "model.text_dim=8",
       "model.text_len=6", "model.text_mask=false", "model.class_dropout=0.0"]


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dit") / "wan"
    make_run(run, WAN)  # RGB 8 x 16 x 16 clips, caption tokens of width 8
    return run


def _in_process(run: Path, noise, steps: int, **kwargs) -> np.ndarray:
    from safetensors.torch import load_file

    from mhla_dist.config import load_config
    from mhla_dist.model.rectified_flow import euler_sample
    from mhla_dist.model.video import build_dit
    from mhla_dist.parallel import build_topology, destroy_topology

    cfg = load_config(run / "config.yaml", ["parallel.tp=1", "parallel.cp=1"])
    build_topology()
    try:
        model = build_dit(cfg.model)
        model.load_state_dict(load_file(str(run / "model.safetensors")))
        return euler_sample(model.eval(), noise, None, steps, **kwargs).numpy()
    finally:
        destroy_topology()


def test_caption_tokens_padded_to_text_len_and_guided(wan_run, tmp_path):
    tokens = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "tokens.npy", tokens)
    got = sample(wan_run, tmp_path / "a", "--caption", tmp_path / "tokens.npy", "--num", "2",
                 "--cfg-scale", "3")
    noise = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(2, 6, 8)  # text_mask: false pads with zeros to text_len, all attended
    text[:, :3] = torch.from_numpy(tokens)
    want = _in_process(wan_run, noise, 3, cfg_scale=3.0, text=text)
    np.testing.assert_array_equal(got, want)
    unguided = _in_process(wan_run, noise, 3, text=text)
    assert np.abs(want - unguided).max() > 1e-3  # the guidance and the caption matter
    # one row per sample, [num, L, D]
    np.save(tmp_path / "rows.npy", np.stack([tokens, -tokens]))
    rows = sample(wan_run, tmp_path / "b", "--caption", tmp_path / "rows.npy")
    assert rows.shape == (2, 3, 8, 16, 16) and np.abs(rows[0] - rows[1]).max() > 1e-4


def test_caption_token_errors(wan_run, tmp_path):
    for shape, message in (((7, 8), "has 7 tokens; the model takes 1 to text_len=6"),
                           ((8,), r"has shape \[8\]; the model takes \[L, text_dim\]"),
                           ((3, 5), r"\[L, text_dim\] or \[num, L, text_dim\] with "
                                    r"text_dim=8")):
        np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
        proc = cli(wan_run, "--caption", tmp_path / "bad.npy", "--out", tmp_path / "x")
        assert proc.returncode == 2
        assert re.search(message, proc.stderr), proc.stderr


def test_vae_decodes_latent_samples_for_the_pictures(tmp_path):
    pytest.importorskip("diffusers")
    from mhla_dist.data import load_vae
    from tests.data.test_vae import save_tiny_vae

    vae_dir = save_tiny_vae(tmp_path / "vae", "kl")  # 4 latent channels, 2x down in space
    run = tmp_path / "latents"
    make_run(run, ["model.in_channels=4", "model.height=8", "model.width=8",
                   "model.patch=[1,1,1]"])
    out = tmp_path / "s"
    latents = sample(run, out, "--vae", vae_dir, "--num", "2", "--zoom", "1")
    assert latents.shape == (2, 4, 8, 8, 8)  # samples.npy keeps the latents
    frames = load_vae(vae_dir).decode(torch.from_numpy(latents)).numpy()
    assert frames.shape == (2, 3, 8, 16, 16)
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (2 * 16, 8 * 16, 3)  # the decoded RGB frames, not the latents
    from tools.video_pictures import clip_frames_to_grid

    np.testing.assert_array_equal(grid, clip_frames_to_grid(frames))
    proc = cli(run, "--vae", tmp_path / "nowhere", "--out", tmp_path / "y")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
