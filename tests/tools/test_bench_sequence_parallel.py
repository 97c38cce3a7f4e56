"""`tools/bench_sequence_parallel.py` at a tiny size: 2 spawned TP ranks per point, the
residual stream between the blocks exactly halved by sequence parallelism, the saved
activations smaller, the JSON and text written."""

import json
import subprocess
import sys

from tests.train.launching import ROOT


def test_bench_sequence_parallel_halves_the_stream_between_blocks(tmp_path):
    subprocess.run([sys.executable, "tools/bench_sequence_parallel.py", "--n", "256",
                    "--hidden", "32", "--layers", "2", "--blocks", "4", "--out", str(tmp_path)],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads((tmp_path / "bench_sp_cpu.json").read_text())
    assert len(report["rows"]) == 4
    for ckpt in ("True", "False"):
        ratios = report["summary"][f"ckpt={ckpt}"]
        assert ratios["between_blocks_bytes"] == 0.5
        assert ratios["saved_bytes"] < 1.0
    assert (tmp_path / "bench_sp_cpu.txt").read_text().startswith("LM forward+backward")
