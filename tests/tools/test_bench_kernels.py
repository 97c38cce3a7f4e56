"""tools/bench_kernels.py, the GPU benchmark, on its CPU dry run: the plumbing a device
session relies on (reference check, checks, timing rows, the JSON written as it goes,
the time budget) and the arithmetic of the issue's target figures."""

from __future__ import annotations

import json

from tools import bench_kernels


def test_dry_run_checks_then_times_and_writes_json(tmp_path):
    out = tmp_path / "k.json"
    bench_kernels.main(["--dry-run", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] and report["gpu"] == "cpu-interpreter"
    assert len(report["reference_checks"]) == 4
    assert all(c["o"] < bench_kernels.REF_TOL for c in report["reference_checks"])
    assert {(r["impl"], r["mode"]) for r in report["results"]} == {
        (i, m) for i in ("triton", "torch", "sdpa_flash") for m in ("fwd", "fwd+bwd")}
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert (tmp_path / "k.png").is_file()


def test_a_failing_check_is_reported_and_not_timed(tmp_path, monkeypatch):
    real = bench_kernels.implementations

    def broken(causal, block_size):
        impls = real(causal, block_size)
        if block_size == 16:  # a wrong kernel: 5% off
            triton = impls["triton"]
            impls["triton"] = lambda *t: 1.05 * triton(*t)
        return impls

    monkeypatch.setattr(bench_kernels, "implementations", broken)
    out = tmp_path / "k.json"
    bench_kernels.main(["--dry-run", "--out", str(out), "--causal", "causal"])
    report = json.loads(out.read_text())
    assert {c["block_size"]: c["passed"] for c in report["checks"]} == {8: True, 16: False}
    assert {r["block_size"] for r in report["results"] if r["impl"] == "triton"} == {8}


def test_time_budget_keeps_what_was_measured(tmp_path):
    out = tmp_path / "k.json"
    bench_kernels.main(["--dry-run", "--out", str(out), "--time-budget-s", "1e-9"])
    report = json.loads(out.read_text())
    assert not report["complete"] and report["results"] == [] and report["checks"]


def test_target_figures():
    t = bench_kernels.TARGET

    def row(impl, causal, mode, ms, c=t["block_size"], frac=0.0):
        return dict(impl=impl, causal=causal, mode=mode, ms=ms, n=t["n"], d=t["d"],
                    block_size=c, frac_copy_bw=frac)

    rows = [row("triton", False, "fwd", 1.0, frac=0.7),
            row("triton", False, "fwd", 1.0, c=64),
            row("triton", False, "fwd+bwd", 2.0),
            row("sdpa_flash", False, "fwd+bwd", 50.0, None),
            row("triton", True, "fwd+bwd", 3.0),
            row("fla_chunk_linear", True, "fwd+bwd", 2.0, None)]
    got = bench_kernels.targets(rows)
    assert got["noncausal_fwd_frac_copy_bw"]["value"] == 0.7
    assert got["noncausal_fwd_bwd_speedup_over_sdpa_flash"]["value"] == 25.0
    assert got["causal_fwd_bwd_time_over_fla"]["value"] == 1.5
    assert "causal_fwd_bwd_speedup_over_sdpa_flash" not in got
