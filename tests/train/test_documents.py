"""Packed documents through training: with `data.document_masking` (the default) a CP = 2
run of a hybrid, per-head-Mc LM computes the single-process losses (global offsets,
documents cut by the CP boundary), the masking is really on (the losses differ without
it), and the command a user types (torchrun, 2 processes, bf16, CP = 2, gradient
accumulation) trains."""

import json
import subprocess

from tests.parallel.harness import run_ranks
from tests.train.launching import ROOT, launch_env, torchrun_command
from tests.train.runs import TINY_RUN, losses, short_documents, train_rank_fn

MODEL = ["model.softmax_layers=[1]", "model.per_head_mixing=true", "model.rotary=true",
         "train.steps=4"]


def test_cp2_packed_losses_equal_one_process_and_masking_is_on(tmp_path):
    # Documents of 10-150 tokens: every 64-token window holds several.
    run = [*MODEL, f"data.train={short_documents(tmp_path / 'docs', num=200)}"]
    cp2 = losses(run_ranks(train_rank_fn, 2, [f"run_dir={tmp_path / 'cp2'}",
                                               "parallel.cp=2", *run])[0])
    one = losses(run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'one'}", *run])[0])
    off = losses(run_ranks(train_rank_fn, 1, [f"run_dir={tmp_path / 'off'}",
                                               "data.document_masking=false", *run])[0])
    assert len(cp2) == len(one) == 4
    assert all(abs(a - b) < 1e-4 * abs(b) for a, b in zip(cp2, one, strict=True)), (cp2, one)
    assert all(abs(a - b) > 1e-3 for a, b in zip(off, one, strict=True)), (off, one)


def test_torchrun_bf16_cp2_grad_accum_with_documents(tmp_path):
    run_dir = tmp_path / "run"
    data = f"data.train={short_documents(tmp_path / 'docs', num=200)}"
    overrides = [*TINY_RUN, *MODEL, data, "parallel.cp=2", "zero.stage=2",
                 "train.precision=bf16", "train.grad_accum=2", f"run_dir={run_dir}"]
    proc = subprocess.run(torchrun_command("configs/lm/tiny.yaml", overrides), cwd=ROOT,
                          env=launch_env(2), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stderr + proc.stdout)[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in rows)
    assert "document_masking: true" in (run_dir / "config.yaml").read_text()
