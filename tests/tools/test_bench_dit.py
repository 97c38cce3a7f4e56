"""tools/bench_dit.py: the CLI end to end at tiny sizes (both variants timed, the skipped
SDPA cell reported, table, breakdown, JSON, text and PNG), the two variants differing only
in their self-attention, and the target's arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tools import bench_child, bench_dit

REPO = Path(__file__).resolve().parents[2]
# A process group built by an earlier test writes a world of one into os.environ.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = dict(bench_dit.DEFAULT_MODEL, in_channels=4, height=16, width=16, hidden_size=32)


def test_cli_times_both_variants_and_writes_the_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "tools/bench_dit.py", "--tokens", "128,256", "--warmup", "0",
         "--repeats", "1", "--sdpa-max-tokens", "128", "--out", str(out), "in_channels=4",
         "height=16", "width=16", "hidden_size=32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench_dit_cpu.json").read_text())
    rows = {(r["attention"], r["tokens"]): r for r in report["results"]}
    assert set(rows) == {(a, n) for a in ("mhla", "sdpa") for n in (128, 256)}
    assert rows["sdpa", 256]["status"].startswith("skipped") and "step_ms" not in rows[
        "sdpa", 256]
    for key in (("mhla", 128), ("sdpa", 128), ("mhla", 256)):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["step_cpu_ms"] > 0 and len(r["step_ms_each"]) == 1
        assert r["peak_bytes"] > 0 and r["parameters"] > 0
    # 64 tokens a frame, one block a frame: 2 and 4 blocks of 64 tokens
    assert (rows["mhla", 256]["num_tokens"], rows["mhla", 256]["frames"]) == (256, 4)
    assert (rows["mhla", 256]["num_blocks"], rows["mhla", 256]["block_size"]) == (4, 64)
    assert report["models"]["sdpa"]["softmax_layers"] == [0, 1]
    assert report["models"]["mhla"]["softmax_layers"] == []
    assert report["models"]["mhla"]["hidden_size"] == 32
    assert report["command"][0] == "bench_dit.py" and "hidden_size=32" in report["command"]
    assert report["env"] == bench_child.MALLOC_ENV and report["torch"] == torch.__version__
    parts = report["breakdown"]["parts"]
    assert report["breakdown"]["tokens"] == 256
    assert set(parts) == {"qkvo projections", "attention core", "mlp", "rest"}
    assert abs(sum(p["fraction"] for p in parts.values()) - 1) < 1e-9
    assert report["targets"]["sdpa_over_mhla_step_32k"]["value"] is None  # no 32K point
    text = proc.stdout
    assert "MHLA ms" in text and "SDPA ms" in text and "SDPA/MHLA" in text
    line = next(x for x in text.splitlines() if x.split()[:1] == ["256"])
    assert "skipped" in line and "sdpa skipped (tokens > --sdpa-max-tokens 128)" in line
    assert "where the MHLA step goes at 256 tokens" in text
    assert "SKIP sdpa_over_mhla_step_32k" in text
    assert (out / "bench_dit_cpu.txt").read_text().strip() in text
    assert (out / "bench_dit_cpu.png").stat().st_size > 0


def test_variants_differ_only_in_self_attention():
    from mhla_dist.convert.model_spec import single_rank_groups

    spec = dict(base=TINY, tokens=256, frames_per_block=2, seed=0, device="cpu",
                dtype="float32")
    with single_rank_groups() as group:
        models = bench_dit.build_models(spec, bench_dit.VARIANTS, group)
        inputs = bench_dit.sampler_inputs(models["mhla"].cfg, 1, 0, "cpu")
        out_m, out_s = (bench_dit.sampler_step(m, inputs, 4.0) for m in models.values())
    mhla, sdpa = models["mhla"], models["sdpa"]
    assert [b.softmax for b in mhla.blocks] == [False, False]
    assert [b.softmax for b in sdpa.blocks] == [True, True]
    assert (mhla.cfg.num_blocks, mhla.cfg.block_size) == (2, 128)  # 2 frames a block
    a, b = mhla.state_dict(), sdpa.state_dict()
    assert set(a) - set(b) == {"blocks.0.attn.mixing", "blocks.1.attn.mixing"}
    assert set(b) <= set(a)
    for k, t in b.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, a[k]), k
    assert a["blocks.0.adaLN_modulation.1.weight"].abs().sum() > 0  # no longer adaLN-Zero
    assert out_m.shape == out_s.shape == inputs["noise"].shape == (1, 4, 4, 16, 16)
    assert torch.isfinite(out_m).all() and torch.isfinite(out_s).all()
    assert not torch.allclose(out_m, out_s)  # the attention reaches the sample


def test_grid_config_rounds_to_whole_blocks():
    cfg = bench_dit.grid_config(bench_dit.DEFAULT_MODEL, 32768, "mhla")
    assert (cfg.num_tokens, cfg.frames, cfg.block_grid, cfg.block_size) == (
        32768, 128, [128, 1, 1], 256)
    wan = bench_dit.grid_config(dict(bench_dit.DEFAULT_MODEL, height=60, width=104,
                                     block_grid=[1, 5, 4]), 32768, "sdpa", 7)
    assert (wan.num_tokens, wan.frames, wan.block_grid) == (32760, 21, [3, 5, 4])
    assert wan.softmax_layers == [0, 1]


def test_target_and_its_verdict():
    rows = [dict(attention="mhla", tokens=32768, step_ms=100.0),
            dict(attention="sdpa", tokens=32768, step_ms=450.0)]
    got = bench_dit.targets(rows, "cpu")["sdpa_over_mhla_step_32k"]
    assert (got["value"], got["min"], got["met"]) == (4.5, 4.0, True)
    assert "PASS sdpa_over_mhla_step_32k: 4.50x" in bench_dit.target_lines(
        bench_dit.targets(rows, "cpu"))
    assert bench_dit.targets(rows, "cuda")["sdpa_over_mhla_step_32k"]["met"] is True
    rows[1]["step_ms"] = 300.0
    assert bench_dit.targets(rows, "cpu")["sdpa_over_mhla_step_32k"]["met"] is False
    assert bench_dit.targets(rows[:1], "cpu")["sdpa_over_mhla_step_32k"]["met"] is None
