"""tools/compare_attention.py: the CLI end to end on a tiny MQAR grid (every run trained by
the trainer in its own process, the JSON, text and PNG, a second invocation reusing the
finished runs), the variants' config overrides, and when a run is (not) trained again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import compare_attention as ca

REPO = Path(__file__).resolve().parents[2]
# A process group built by an earlier test writes a world of one into os.environ.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _overrides(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run["overrides"])


def test_cli_trains_every_variant_reports_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    out = tmp_path / "cmp"
    cmd = [sys.executable, "tools/compare_attention.py", "--points", "64x4", "--variants",
           "mhla,linear", "--widths", "32", "--lrs", "3e-3", "--steps", "20", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare_attention_cpu.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert set(runs) == {"mhla", "linear"}
    for r in runs.values():
        assert r["status"] == "ok" and not r["reused"], r
        assert math.isfinite(r["eval_accuracy"]) and 0.0 <= r["eval_accuracy"] <= 1.0
        assert math.isfinite(r["eval_loss"]) and r["wall_s"] > 0 and r["cpu_s"] > 0
        assert r["evals"][-1]["step"] == 20
    assert {s["variant"] for s in report["summary"]} == {"mhla", "linear"}
    assert all(s["best_lr"] == 3e-3 and s["best_accuracy"] is not None
               for s in report["summary"])
    assert report["config"]["steps"] == 20 and "torch" in report and "device" in report
    assert (out / "compare_attention_cpu.png").stat().st_size > 0
    assert (out / "compare_attention_cpu.txt").read_text().strip() in proc.stdout
    run_dirs = {v: out / "runs" / r["name"] for v, r in runs.items()}
    linear_cfg = (run_dirs["linear"] / "config.yaml").read_text()
    assert "block_size: 64" in linear_cfg and "num_blocks: 1" in linear_cfg
    for d in run_dirs.values():  # the weights the comparison does not need are gone
        assert not (d / "model.safetensors").exists() and not (d / "checkpoints").exists()
    before = {v: ((d / "metrics.jsonl").stat().st_mtime_ns, (d / "metrics.jsonl").read_text())
              for v, d in run_dirs.items()}

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "compare_attention_cpu.json").read_text())
    assert all(r["reused"] for r in second["runs"])
    assert [r["eval_accuracy"] for r in second["runs"]] == [
        r["eval_accuracy"] for r in report["runs"]]
    after = {v: ((d / "metrics.jsonl").stat().st_mtime_ns, (d / "metrics.jsonl").read_text())
             for v, d in run_dirs.items()}
    assert after == before
    assert "ok (reused)" in again.stdout


def test_variant_overrides_cover_the_grid():
    args = ca.parse_args(["--points", "64x4,256x16", "--widths", "64,128", "--lrs",
                          "1e-3,3e-3", "--layers", "8", "--steps", "1000", "--out", "/tmp/x"])
    runs = ca.plan(args)
    assert len(runs) == 2 * 2 * len(ca.VARIANTS) * 2
    assert len({r["name"] for r in runs}) == len(runs)
    ca.check_runs(runs)  # every run's config loads and validates
    for r in runs:
        o = _overrides(r)
        assert o["model.hidden_size"] == str(r["width"])
        assert o["model.num_heads"] == str(r["width"] // 32)  # head dim 32 at every width
        assert o["model.num_layers"] == "8" and o["train.steps"] == "1000"
        assert o["train.eval_interval"] == "1000" and o["schedule.warmup_steps"] == "100"
        assert o["logging.wandb.mode"] == "disabled" and o["checkpoint.interval"] == "0"
        preset_block = {64: 16, 256: 32}[r["seq_len"]]  # configs/eval/mqar_*.yaml
        if r["variant"] == "linear":
            assert o["model.block_size"] == str(r["seq_len"]) and r["num_blocks"] == 1
        else:
            assert o["model.block_size"] == str(preset_block)
        layers = o.get("model.softmax_layers")
        assert layers == {"softmax": "[0,1,2,3,4,5,6,7]", "hybrid": "[3,7]"}.get(r["variant"])
        block_local = {"model.mixing_init": "identity", "optim.mixing_lr_scale": "0"}
        assert (block_local.items() <= o.items()) == (r["variant"] == "block-local")
        mc_scale = {"mhla-mc10": "10", "mhla-mc0.1": "0.1", "block-local": "0"}
        assert o.get("optim.mixing_lr_scale") == mc_scale.get(r["variant"])


def test_hybrid_of_a_shallow_model_uses_its_last_layer_and_blocks_override_the_preset():
    assert ca.hybrid_layers(12) == ([3, 7, 11], None)
    layers, note = ca.hybrid_layers(2)
    assert layers == [1] and "last layer" in note
    args = ca.parse_args(["--points", "128x8", "--variants", "hybrid,mhla", "--widths", "64",
                          "--lrs", "1e-3", "--blocks", "4", "--out", "/tmp/x"])
    runs = ca.plan(args)  # the preset's 2 layers
    assert [_overrides(r)["model.block_size"] for r in runs] == ["32", "32"]
    assert _overrides(runs[0])["model.softmax_layers"] == "[1]"
    quick = ca.parse_args(["--quick"])
    assert (quick.points, quick.widths, quick.lrs, quick.variants, quick.steps) == (
        [(64, 4)], [64], [3e-3], ["mhla", "linear"], 300)
    with pytest.raises(SystemExit):
        ca.parse_args(["--steps", "100", "--eval-interval", "30"])


def _write_metrics(run_dir: Path, steps: int, evals: list[tuple[int, float]]) -> None:
    rows = [{"step": s, "loss": 1.0, "samples_per_s": 100.0, "eval_loss": 2.0,
             "eval_accuracy": a} for s, a in evals]
    if not evals or evals[-1][0] != steps:
        rows.append({"step": steps, "loss": 1.0, "samples_per_s": 100.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_read_metrics_takes_the_final_eval_and_keeps_the_best(tmp_path):
    _write_metrics(tmp_path, 300, [(100, 0.5), (200, 0.9), (300, 0.7)])
    got = ca.read_metrics(tmp_path, 300)
    assert (got["eval_accuracy"], got["best_eval_accuracy"], got["best_eval_step"]) == (
        0.7, 0.9, 200)
    assert ca.read_metrics(tmp_path, 400) is None  # no eval at the last step: unfinished
    _write_metrics(tmp_path, 300, [(100, 0.5)])
    assert ca.read_metrics(tmp_path, 300) is None


def test_a_finished_run_is_reused_unless_forced_or_changed(tmp_path, monkeypatch):
    trained = []

    def fake_child(cmd, log_path, env, timeout):
        run_dir = log_path.parent
        steps = int(next(c for c in cmd if c.startswith("train.steps=")).split("=")[1])
        _write_metrics(run_dir, steps, [(steps, 0.25)])
        trained.append(steps)
        return 0, 1.0, 2.0

    monkeypatch.setattr(ca, "run_child", fake_child)
    args = ca.parse_args(["--points", "64x4", "--variants", "mhla", "--widths", "64",
                          "--lrs", "1e-3", "--steps", "50", "--out", str(tmp_path)])
    (run,) = ca.plan(args)

    def go(r, force=False):
        return ca.train(r, tmp_path, force=force, keep_weights=False, jobs=1, timeout=60)

    first = go(run)
    assert (first["status"], first["reused"], first["eval_accuracy"]) == ("ok", False, 0.25)
    assert go(run)["reused"] and trained == [50]
    assert not go(run, force=True)["reused"] and trained == [50, 50]
    # an interrupted run (no final eval) is trained again from scratch
    _write_metrics(tmp_path / run["name"], 50, [])
    assert not go(run)["reused"] and len(trained) == 3
    changed = dict(run, overrides=[*run["overrides"], "optim.weight_decay=0.0"])
    assert not go(changed)["reused"] and len(trained) == 4
    assert go(changed)["reused"] and len(trained) == 4
