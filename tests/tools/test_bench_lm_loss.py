"""`tools/bench_lm_loss.py` end to end at a tiny shape: both variants measured in their own
process, the fused loss agrees with the plain one, the table, JSON and PNG are written."""

import json
import subprocess
import sys

from tests.train.launching import ROOT


def test_bench_lm_loss_runs_and_reports(tmp_path):
    out = subprocess.run([sys.executable, "tools/bench_lm_loss.py", "--n", "256", "--vocab",
                          "2048", "--hidden", "32", "--blocks", "4", "--reps", "1", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "fused / plain peak" in out.stdout
    report = json.loads((tmp_path / "bench_lm_loss_cpu.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["plain", "fused"]
    assert all(r["peak_above_model_bytes"] >= 0 and r["seconds"] > 0 for r in report["rows"])
    assert report["agreement"]["loss_rel"] < 1e-5
    assert report["agreement"]["max_grad_rel"] < 1e-4
    assert (tmp_path / "bench_lm_loss_cpu.png").stat().st_size > 0
