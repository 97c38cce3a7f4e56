"""Tiny runs of every model launched as a user launches them, over a pairwise matrix of
model x layout x precision x gradient accumulation, each trained, resumed and sampled.

| row | model   | layout | precision | grad_accum | zero.stage |
|-----|---------|--------|-----------|------------|------------|
| 1   | LM      | 1      | fp32      | 1          | 0          |
| 2   | LM      | CP2    | bf16      | 2          | 2          |
| 3   | LM      | TP2+SP | bf16      | 1          | 3          |
| 4   | DiT-cls | 1      | bf16      | 2          | 1          |
| 5   | DiT-cls | CP2    | fp32      | 1          | 3          |
| 6   | DiT-cls | TP2    | fp32      | 2          | 1          |
| 7   | DiT-cap | 1      | bf16      | 1          | 2          |
| 8   | DiT-cap | CP2    | fp32      | 2          | 0          |
| 9   | DiT-cap | TP2+SP | bf16      | 2          | 2          |

Model x layout is the full 3 x 3 grid; each model's three rows, and each layout's three
rows, hold both precisions and both grad_accum values; and precision x grad_accum takes all
four combinations (fp32/1: rows 1, 5; fp32/2: 6, 8; bf16/1: 3, 7; bf16/2: 2, 4, 9). So every
pair of factor values is launched at least once, in 9 runs instead of the full 36.
ZeRO is not a factor; the stages are spread so that each of 0-3 is launched at least once.
Two of the TP2 rows run with sequence parallelism (`parallel.sequence_parallel=true`).

Each row trains 2 steps (evaluating and checkpointing), resumes to 4 steps with
`resume=auto`, then loads `model.safetensors` in the user's sampler (`tools/generate.py`
or `tools/sample_video.py`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.train.launching import ROOT, launch_env
from tests.train.runs import TINY_DIT_RUN, TINY_RUN

CAPTION_DIM = 8


@dataclass(frozen=True)
class Row:
    model: str  # lm | dit-cls | dit-cap
    layout: str  # 1 | cp2 | tp2 | tp2sp
    precision: str  # fp32 | bf16
    grad_accum: int
    zero_stage: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layout}-{self.precision}-ga{self.grad_accum}"


ROWS = [
    Row("lm", "1", "fp32", 1, 0),
    Row("lm", "cp2", "bf16", 2, 2),
    Row("lm", "tp2sp", "bf16", 1, 3),
    Row("dit-cls", "1", "bf16", 2, 1),
    Row("dit-cls", "cp2", "fp32", 1, 3),
    Row("dit-cls", "tp2", "fp32", 2, 1),
    Row("dit-cap", "1", "bf16", 1, 2),
    Row("dit-cap", "cp2", "fp32", 2, 0),
    Row("dit-cap", "tp2sp", "bf16", 2, 2),
]


# ---------------------------------------------------------------- data (once per module)

def make_clips(out: Path, caption_dim: int = 0) -> str:
    """Synthetic clip shards through the user's CLI; returns the loader pattern it prints."""
    cmd = [sys.executable, "tools/make_synthetic_video.py", "--output", str(out),
           "--num-clips", "32", "--frames", "8", "--size", "16", "--shard-size", "8"]
    if caption_dim:
        cmd += ["--caption-dim", str(caption_dim)]
    proc = run_checked(cmd)
    pattern = proc.stdout.split("loader pattern:", 1)[1].strip()
    assert pattern == json.loads((out / "clips.json").read_text())["pattern"]
    return pattern


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, dict[str, str]]:
    """`{model: {"train": ..., "eval": ...}}` for the three models."""
    from mhla_dist.data import build_default_corpus

    root = tmp_path_factory.mktemp("matrix_data")
    info = build_default_corpus(root / "corpus", docs_per_shard=8)
    cls_dir, cap_dir = root / "clips", root / "clips_captioned"
    return {
        "lm": {"train": str(info.train), "eval": str(info.eval)},
        # eval reads the clip folder itself, the other form the loader takes
        "dit-cls": {"train": make_clips(cls_dir), "eval": str(cls_dir)},
        "dit-cap": {"train": make_clips(cap_dir, CAPTION_DIM), "eval": str(cap_dir)},
    }


# ---------------------------------------------------------------- launching

def run_checked(cmd: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """Run `cmd` in the repo root; fail with the command and the output's tail unless it
    exits 0."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=launch_env(nproc))
    if proc.returncode != 0:
        tail = (proc.stderr + proc.stdout)[-3000:]
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def train_command(row: Row, overrides: list[str]) -> tuple[list[str], int]:
    """The user's command line for `row` and its process count."""
    cfg = "configs/lm/tiny.yaml" if row.model == "lm" else "configs/dit/tiny.yaml"
    if row.layout == "1":
        return [sys.executable, "-m", "mhla_dist.train", "--config", cfg, *overrides], 1
    return ["bash", "launch/torchrun.sh", "--config", cfg, *overrides], 2


def overrides_for(row: Row, data: dict[str, str], run_dir: Path, steps: int) -> list[str]:
    if row.model == "lm":
        base = list(TINY_RUN)
    elif row.model == "dit-cls":
        base = list(TINY_DIT_RUN)  # model.num_classes=4
    else:
        base = [*TINY_DIT_RUN, "model.num_classes=0", f"model.caption_dim={CAPTION_DIM}"]
    layout = {"1": [], "cp2": ["parallel.cp=2"], "tp2": ["parallel.tp=2"],
              "tp2sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}[row.layout]
    return [*base, *layout, f"run_dir={run_dir}", f"data.train={data['train']}",
            f"data.eval={data['eval']}", f"train.precision={row.precision}",
            f"train.grad_accum={row.grad_accum}", f"zero.stage={row.zero_stage}",
            f"train.steps={steps}", "checkpoint.interval=2", "logging.wandb.mode=disabled",
            "train.eval_interval=1", "train.eval_steps=1", "logging.interval=1"]


def train(row: Row, data: dict[str, str], run_dir: Path, steps: int) -> str:
    """Launch `row` for `steps` steps; returns its combined stderr and stdout."""
    cmd, nproc = train_command(row, overrides_for(row, data, run_dir, steps))
    proc = run_checked(cmd, nproc)
    return proc.stderr + proc.stdout


# ---------------------------------------------------------------- checks

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def is_finite(value) -> bool:
    # metrics.jsonl writes a non-finite float as the string "nan" / "inf"
    return isinstance(value, (int, float)) and math.isfinite(value)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_clean_log(log: str) -> None:
    for marker in ("FutureWarning", "Traceback"):
        assert marker not in log, f"{marker} in the launch's output:\n{log[-3000:]}"


def assert_fp32_finite_weights(path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert tensors, f"{path} holds no tensors"
    bad_dtype = {n: str(t.dtype) for n, t in tensors.items() if t.dtype != torch.float32}
    assert not bad_dtype, f"{path}: tensors not float32 (masters must be saved): {bad_dtype}"
    bad = [n for n, t in tensors.items() if not t.isfinite().all()]
    assert not bad, f"{path}: non-finite tensors {bad}"


def check_sampler(row: Row, run_dir: Path, tmp_path: Path) -> None:
    if row.model == "lm":
        proc = run_checked([sys.executable, "tools/generate.py", str(run_dir), "--prompt", "The ",
                            "--max-new-tokens", "8"])
        assert proc.stdout.strip(), "tools/generate.py printed no text"
        return
    out = tmp_path / "samples"
    cmd = [sys.executable, "tools/sample_video.py", str(run_dir), "--steps", "2", "--num", "2",
           "--out", str(out), "--cfg-scale", "2.0"]
    if row.model == "dit-cap":
        caption = tmp_path / "caption.npy"
        np.save(caption, np.linspace(-1, 1, CAPTION_DIM, dtype=np.float32))
        cmd += ["--caption", str(caption)]
    proc = run_checked(cmd)
    paths = proc.stdout.split()
    assert len(paths) == 4 and all(Path(p).exists() for p in paths), proc.stdout
    assert str(out / "samples.npy") in paths and str(out / "samples.gif") in paths
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2, 3, 8, 16, 16), samples.shape
    assert np.isfinite(samples).all()


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_launch_train_resume_sample(row, datasets, tmp_path):
    data, run_dir = datasets[row.model], tmp_path / "run"

    log = train(row, data, run_dir, steps=2)
    assert_clean_log(log)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2], rows
    for r in rows:
        assert is_finite(r["loss"]) and is_finite(r["grad_norm"]), r
    assert any(is_finite(r.get("eval_loss")) for r in rows), f"no finite eval_loss: {rows}"
    assert latest(run_dir) == "step00000002"
    assert (run_dir / "model.safetensors").exists()

    log = train(row, data, run_dir, steps=4)
    assert_clean_log(log)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], rows
    assert all(is_finite(r["loss"]) for r in rows), rows
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed and all("step00000002" in line for line in resumed), log[-3000:]
    assert latest(run_dir) == "step00000004"

    assert_fp32_finite_weights(run_dir / "model.safetensors")
    check_sampler(row, run_dir, tmp_path)
