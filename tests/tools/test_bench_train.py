"""tools/bench_train.py: the CLI end to end at tiny sizes (every point measured in its own
process, the skipped one reported, table, breakdown, JSON, text and PNG), and the
arithmetic of the issue's targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools import bench_train

REPO = Path(__file__).resolve().parents[2]
# A process group built by an earlier test writes a world of one into os.environ.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_cli_measures_every_point_and_writes_the_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--ns", "256,512", "--hidden", "32",
         "--heads", "2", "--num-blocks", "4", "--warmup", "1", "--steps", "1",
         "--softmax-max-n", "256", "--breakdown-n", "256", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench_train_cpu.json").read_text())
    rows = {(r["attention"], r["n"]): r for r in report["results"]}
    assert set(rows) == {(a, n) for a in ("mhla", "softmax") for n in (256, 512)}
    assert rows["softmax", 512]["status"].startswith("skipped")
    for key in (("mhla", 256), ("mhla", 512), ("softmax", 256)):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["optimizer_ms"] > 0
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["peak_bytes_per_token"] > 0
        assert 4.0 < r["loss_first"] < 7.0  # ~ln(257): a real loss on random bytes
    assert (rows["mhla", 512]["block_size"], rows["mhla", 512]["num_blocks"]) == (128, 4)
    assert report["models"]["softmax"]["softmax_layers"] == [0, 1]
    assert report["models"]["mhla"]["softmax_layers"] == []
    # the breakdowns at --breakdown-n, of both models: every part timed, shares summing
    # to one; the MHLA step without attention against the softmax step
    for key in ("breakdown", "softmax_breakdown"):
        parts = report[key]["parts"]
        assert report[key]["n"] == 256
        assert set(parts) == {"attention", "mlp", "embedding+norms", "head+loss", "optimizer"}
        assert all(p["ms"] > 0 for p in parts.values())
        assert abs(sum(p["fraction"] for p in parts.values()) - 1) < 1e-9
        assert 0 < parts["attention"]["projections_ms"] < parts["attention"]["ms"]
    floor = report["without_attention"]
    parts = report["breakdown"]["parts"]
    assert floor["mhla_without_attention_ms"] == sum(
        p["ms"] for name, p in parts.items() if name != "attention")
    assert floor["softmax_step_ms"] == rows["softmax", 256]["step_ms"]
    assert all(t["value"] is None for t in report["targets"].values())  # no 8K/16K/32K
    text = proc.stdout
    assert "attention       N" in text and "where the MHLA step goes at N=256" in text
    assert "where the softmax step goes at N=256" in text
    assert "without its attention the MHLA step at N=256 would take" in text
    assert "SKIP mhla_step_32k_over_8k" in text
    assert (out / "bench_train_cpu.txt").read_text().strip() in text
    assert (out / "bench_train_cpu.png").stat().st_size > 0


def _row(attention, n, step_ms, per_token=1000.0):
    return dict(attention=attention, n=n, status="ok", step_ms=step_ms,
                peak_bytes_per_token=per_token)


def test_targets_and_their_verdicts():
    rows = [_row("mhla", 8192, 100.0, 1000.0), _row("mhla", 16384, 210.0),
            _row("mhla", 32768, 430.0, 1300.0), _row("softmax", 16384, 2000.0),
            dict(attention="softmax", n=32768, status="skipped (N > --softmax-max-n 16384)")]
    got = bench_train.targets(rows)
    assert got["mhla_step_32k_over_8k"]["value"] == 4.3
    assert got["mhla_step_32k_over_8k"]["met"] is True
    assert got["mhla_peak_per_token_32k_over_8k"]["value"] == 1.3
    assert got["mhla_peak_per_token_32k_over_8k"]["met"] is False
    assert got["mhla_over_softmax_step_16k"]["value"] == 0.105
    text = bench_train.target_lines(got)
    assert "PASS mhla_step_32k_over_8k: 4.300" in text
    assert "FAIL mhla_peak_per_token_32k_over_8k: 1.300" in text
    assert "FAIL mhla_over_softmax_step_16k: 0.105" in text
    missing = bench_train.targets(rows[:2])
    assert all(t["value"] is None and t["met"] is None for t in missing.values())


def test_without_attention_is_the_rest_of_the_mhla_step_over_the_softmax_step():
    parts = {"attention": {"ms": 300.0, "projections_ms": 100.0}, "mlp": {"ms": 150.0},
             "embedding+norms": {"ms": 20.0},
             "head+loss": {"ms": 28.0}, "optimizer": {"ms": 2.0}}
    mhla = dict(attention="mhla", n=16384, breakdown={"parts": parts})
    got = bench_train.without_attention(mhla, dict(attention="softmax", step_ms=4000.0))
    assert got == {"n": 16384, "mhla_without_attention_ms": 200.0, "softmax_step_ms": 4000.0,
                   "ratio": 0.05, "attention_projections_ms": 100.0,
                   "ratio_with_projections": 0.075}
    line = bench_train.floor_line(got)
    assert "= 0.050 of the softmax step (4000.0 ms)" in line
    assert "with the attention's projections (100.0 ms) it is 0.075" in line
