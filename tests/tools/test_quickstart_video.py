"""launch/quickstart_video.sh end to end at smoke size (4 steps, 32 clips, 2 Euler steps):
data, 2-process CP=2 training, the loss curve, the labelled grid and the GIF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_video_smoke(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    # PYTHON: this interpreter, already set up (no launch/setup.sh from a test)
    env.update(PYTHON=sys.executable, STEPS="4", CLIPS="32", SAMPLE_STEPS="2",
               DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(["bash", "launch/quickstart_video.sh", f"run_dir={run}",
                           "logging.interval=2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    samples = run / "samples"
    for path in (run / "loss.png", samples / "samples_labelled.png", samples / "samples.gif"):
        assert f" {path}" in proc.stdout, proc.stdout  # the script says where they are
    assert "step 4: train loss" in proc.stdout
    with Image.open(run / "loss.png") as png:
        assert png.format == "PNG"
    with Image.open(samples / "samples_labelled.png") as png:
        # two rows per class (square, disc, triangle, ring) of 16-pixel frames, zoom 6
        assert png.size[1] == 14 + 8 * 96 + 7 * 2
    with Image.open(samples / "samples.gif") as gif:  # one GIF frame per clip frame
        assert gif.n_frames == 4 and gif.size == (8 * 96 + 7 * 2, 14 + 96)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["eval", "train"]
    # The quickstart's recipe: shapes large enough to tell apart at 16x16, x-prediction.
    clips = json.loads((tmp_path / "data" / "train" / "clips.json").read_text())
    assert clips["radius"] == [0.2, 0.32]
    assert "prediction: sample" in (run / "config.yaml").read_text()
