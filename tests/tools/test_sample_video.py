"""tools/sample_video.py on tiny untrained DiT run directories: the files it writes (the
exact grid, the labelled grid, the GIF), seeds, fp32 against bf16 and against
`euler_sample` in-process, guidance, captions, and every refused input exits 2 with an
`error:` naming the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.numerics import rel_err
from tests.train.runs import TINY_DIT_RUN, TINY_RUN
from tools import sample_video

REPO = Path(__file__).resolve().parents[2]
STEPS = "3"
# build_topology() in this process writes a world of one into os.environ; a CLI started
# from here must make its own.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def make_run(run_dir: Path, overrides: list[str]) -> None:
    """A DiT run directory as training leaves it (config.yaml, model.safetensors), with
    random weights moved well off adaLN-Zero's zeros so the model changes its input."""
    from safetensors.torch import save_file

    from mhla_dist.config import config_to_yaml, load_config
    from mhla_dist.model.video import build_dit
    from mhla_dist.parallel import build_topology, destroy_topology
    from tests.model.dit_helpers import perturb

    cfg = load_config(None, TINY_DIT_RUN + overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    build_topology()
    try:
        torch.manual_seed(0)
        model = build_dit(cfg.model)
        perturb(model, seed=1, scale=0.1)
        # the parameters, as the trainer's consolidated file holds them
        save_file({k: p.detach().contiguous() for k, p in model.named_parameters()},
                  str(run_dir / "model.safetensors"))
    finally:
        destroy_topology()


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dit") / "classes"
    make_run(run, [])  # RGB 8 x 16 x 16 clips, 4 classes
    return run


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dit") / "captions"
    make_run(run, ["model.num_classes=0", "model.caption_dim=8", "model.in_channels=4",
                   "model.class_dropout=0.0"])
    return run


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return subprocess.run([sys.executable, "tools/sample_video.py", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


FILES = ["samples.npy", "samples.png", "samples_labelled.png", "samples.gif"]


def sample(run: Path, out: Path, *args: object) -> np.ndarray:
    proc = cli(run, "--steps", STEPS, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out / name) for name in FILES]
    return np.load(out / "samples.npy")


def test_samples_files_seed_and_in_process_equality(class_run, tmp_path):
    a = sample(class_run, tmp_path / "a", "--num", "3", "--shift", "1.5", "--seed", "7")
    assert a.dtype == np.float32 and a.shape == (3, 3, 8, 16, 16)
    assert np.isfinite(a).all()
    with Image.open(tmp_path / "a" / "samples.png") as png:
        assert png.size == (8 * 16, 3 * 16) and png.mode == "RGB"
        grid = np.asarray(png)
    # row 1, column 2 of the grid is sample 1's frame 2, mapped from [-1, 1] to 0..255
    want = np.clip(np.rint((a[1, :, 2] + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(grid[16:32, 32:48], want.transpose(1, 2, 0))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FILES)

    again = sample(class_run, tmp_path / "b", "--num", "3", "--shift", "1.5", "--seed", "7")
    np.testing.assert_array_equal(a, again)

    # The same sampling in this process, from the documented noise and default labels.
    from safetensors.torch import load_file

    from mhla_dist.config import load_config
    from mhla_dist.model.rectified_flow import euler_sample
    from mhla_dist.model.video import build_dit
    from mhla_dist.parallel import build_topology, destroy_topology

    cfg = load_config(class_run / "config.yaml", ["parallel.tp=1", "parallel.cp=1"])
    noise = torch.randn(3, 3, 8, 16, 16, generator=torch.Generator().manual_seed(7))
    build_topology()
    try:
        model = build_dit(cfg.model)
        model.load_state_dict(load_file(str(class_run / "model.safetensors")))
        want = euler_sample(model.eval(), noise, torch.tensor([0, 1, 2]), int(STEPS),
                            shift=1.5)
    finally:
        destroy_topology()
    np.testing.assert_array_equal(a, want.numpy())
    assert rel_err(want, noise) > 0.2  # the model moved the noise: the checks above bite


def test_bf16_cfg_and_labels(class_run, tmp_path):
    fp32 = sample(class_run, tmp_path / "fp32", "--labels", "0", "1", "3", "4")
    bf16 = sample(class_run, tmp_path / "bf16", "--labels", "0", "1", "3", "4",
                  "--dtype", "bf16")
    noise = torch.randn(fp32.shape, generator=torch.Generator().manual_seed(0)).numpy()
    a, b = torch.from_numpy(fp32), torch.from_numpy(bf16)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    err, move_err = rel_err(b, a), rel_err(b - noise, a - noise)
    assert err < 0.1 and move_err < 0.1, (err, move_err)
    assert not torch.equal(a, b)

    guided = sample(class_run, tmp_path / "cfg", "--labels", "0", "1", "3", "4",
                    "--cfg-scale", "4.0")
    assert rel_err(torch.from_numpy(guided), a) > 0.01
    # label 4 is the null class: guidance towards it is no guidance at all
    np.testing.assert_allclose(guided[3], fp32[3], rtol=0, atol=1e-5)


def test_caption_model(caption_run, tmp_path):
    rng = np.random.default_rng(0)
    c1, c2 = rng.standard_normal((2, 8)).astype(np.float32) * 3
    np.save(tmp_path / "c1.npy", c1)  # [D]: for every sample
    np.save(tmp_path / "rows.npy", np.stack([c1, c2]))  # [num, D]: sets num
    one = sample(caption_run, tmp_path / "one", "--num", "2", "--caption", tmp_path / "c1.npy")
    rows = sample(caption_run, tmp_path / "rows", "--caption", tmp_path / "rows.npy")
    assert one.shape == rows.shape == (2, 4, 8, 16, 16) and np.isfinite(one).all()
    np.testing.assert_allclose(rows[0], one[0], rtol=0, atol=1e-5)  # same noise, caption
    assert rel_err(torch.from_numpy(rows[1]), torch.from_numpy(one[1])) > 0.01
    with Image.open(tmp_path / "one" / "samples.png") as png:  # 4 channels: the first, grey
        assert png.size == (8 * 16, 2 * 16) and png.mode == "L"

    proc = cli(caption_run, "--steps", STEPS, "--num", "2", "--out", tmp_path / "zero")
    assert proc.returncode == 0, proc.stderr
    assert "zero captions" in proc.stderr
    zero = np.load(tmp_path / "zero" / "samples.npy")
    assert rel_err(torch.from_numpy(zero), torch.from_numpy(one)) > 0.01


def test_error_exits_2_from_the_command_line(tmp_path, class_run):
    proc = cli(class_run, "--labels", "9", "--out", tmp_path / "never")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "[9]" in proc.stderr
    assert not (tmp_path / "never").exists()


def zoomed(pixels: np.ndarray, zoom: int) -> np.ndarray:
    return pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)


@pytest.mark.parametrize("zoom", [0, 3], ids=["auto", "zoom3"])
def test_gif_and_labelled_grid(class_run, tmp_path, zoom):
    out = tmp_path / "out"
    a = sample(class_run, out, "--labels", "2", "0", "4", "--class-names", "square", "disc",
               "triangle", "ring", "--zoom", zoom, "--fps", "5")
    pixels = sample_video.clip_pixels(a)  # [3, 8, 16, 16, 3]
    z = zoom or sample_video.AUTO_ZOOM_PX // 16
    h = w = 16 * z
    gap, strip = sample_video.GAP, sample_video.LABEL_H
    with Image.open(out / "samples.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 8
        assert gif.size == (3 * w + 2 * gap, strip + h)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200
        for f in (0, 5):
            gif.seek(f)
            frame = np.asarray(gif.convert("RGB")).astype(int)
            tile = frame[strip:, w + gap:2 * w + gap]  # sample 1, frame f
            # a GIF has 256 colours: the tile is quantised, but nearer its own frame than
            # to any other of the clips' frames
            err = np.abs(tile - zoomed(pixels[1, f], z)).mean()
            others = [np.abs(tile - zoomed(pixels[n, g], z)).mean()
                      for n in range(3) for g in range(8) if (n, g) != (1, f)]
            assert err < 12 and err < 0.5 * min(others), (err, min(others))
    with Image.open(out / "samples_labelled.png") as png:
        assert png.mode == "RGB" and png.size[1] == strip + 3 * h + 2 * gap
        assert png.size[0] > 8 * w + 7 * gap  # the names' column
        grid = np.asarray(png)
    # sample 2's last frame ends at the right edge; frame 6 one frame before
    top = strip + 2 * (h + gap)
    np.testing.assert_array_equal(grid[top:top + h, -w:], zoomed(pixels[2, 7], z))
    np.testing.assert_array_equal(grid[top:top + h, -2 * w - gap:-w - gap],
                                  zoomed(pixels[2, 6], z))
    assert (grid[:strip] == 255).mean() > 0.8  # white, the frame numbers in dark type
    assert (grid[:strip] < 128).any()


def test_grey_gif_is_exact(caption_run, tmp_path):
    out = tmp_path / "grey"
    a = sample(caption_run, out, "--num", "2", "--zoom", "2")
    pixels = sample_video.clip_pixels(a)  # the first of 4 channels: [2, 8, 16, 16]
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (2 * 32 + sample_video.GAP,
                                                  sample_video.LABEL_H + 32)
        gif.seek(3)
        frame = np.asarray(gif.convert("L"))
    np.testing.assert_array_equal(frame[sample_video.LABEL_H:, :32], zoomed(pixels[0, 3], 2))
    with Image.open(out / "samples_labelled.png") as png:
        assert png.mode == "L"


def test_row_names():
    names = ["square", "disc", "triangle", "ring"]
    assert sample_video.row_names(5, 4, None, None) == [f"class {i}" for i in (0, 1, 2, 3, 0)]
    assert sample_video.row_names(3, 4, [3, 4, 0], names) == ["ring", "null", "square"]
    assert sample_video.row_names(2, 0, None, None) == ["sample 0", "sample 1"]


def test_bad_zoom_and_fps_exit_2(class_run, tmp_path):
    for flag, value in (("--zoom", "-1"), ("--fps", "0")):
        proc = cli(class_run, flag, value, "--out", tmp_path / "never")
        assert proc.returncode == 2 and f"{flag} " in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    from mhla_dist.config import config_to_yaml, load_config

    run = tmp_path_factory.mktemp("lm")
    (run / "config.yaml").write_text(config_to_yaml(load_config(None, TINY_RUN)))
    return run


def caption_file(tmp_path: Path, shape: tuple[int, ...], value: float = 0.5) -> Path:
    path = tmp_path / f"cap{'x'.join(map(str, shape))}_{value}.npy"
    np.save(path, np.full(shape, value, np.float32))
    return path


@pytest.mark.parametrize("case", [
    "lm", "label_high", "label_negative", "labels_vs_num", "labels_no_classes",
    "caption_dim", "caption_rows", "caption_nan", "caption_no_captions", "cfg_nothing",
    "steps", "missing_run", "missing_weights", "class_names_count", "class_names_no_classes",
])
def test_refused_inputs(case, tmp_path, capsys, class_run, caption_run, lm_run):
    if case == "missing_weights":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text((class_run / "config.yaml").read_text())
    argv, needle = {
        "lm": ([lm_run], "lm model, not a DiT"),
        "label_high": ([class_run, "--labels", "0", "5"], "[5] out of range"),
        "label_negative": ([class_run, "--labels", "-1"], "[0, 4]"),
        "labels_vs_num": ([class_run, "--num", "3", "--labels", "0", "1"], "--num 3 but 2"),
        "labels_no_classes": ([caption_run, "--labels", "1"], "num_classes=0"),
        "caption_dim": ([caption_run, "--caption", caption_file(tmp_path, (5,))],
                        "shape [5]; the model takes [caption_dim] or [num, caption_dim] "
                        "with caption_dim=8"),
        "caption_rows": ([caption_run, "--num", "3", "--caption",
                          caption_file(tmp_path, (2, 8))], "2 rows for 3 samples"),
        "caption_nan": ([caption_run, "--caption", caption_file(tmp_path, (8,), np.nan)],
                        "non-finite"),
        "caption_no_captions": ([class_run, "--caption", caption_file(tmp_path, (8,))],
                                "caption_dim=0"),
        "cfg_nothing": ([caption_run, "--cfg-scale", "3"], "--cfg-scale 3.0 needs labels or "
                        "a caption"),
        "steps": ([class_run, "--steps", "0"], "steps=0"),
        "missing_run": ([tmp_path / "nope"], "does not exist"),
        "missing_weights": ([tmp_path / "run"], "model.safetensors"),
        "class_names_count": ([class_run, "--class-names", "a", "b"],
                              "2 --class-names (a b) for a model of num_classes=4"),
        "class_names_no_classes": ([caption_run, "--class-names", "a"], "num_classes=0"),
    }[case]
    out = tmp_path / "out"
    assert sample_video.main([str(a) for a in argv] + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert needle in captured.err, captured.err
    assert not out.exists()
