"""The topology comes from the launcher's environment: torchrun with 2 processes, and a
process started alone (a world of one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests.parallel.launcher_probe"


def _run(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]


def test_torchrun_two_processes_context_parallel(tmp_path):
    ranks = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", PROBE, str(tmp_path), "2"], tmp_path)
    assert [(r["world"], r["cp"], r["dp"], r["cp_rank"]) for r in ranks] == [(2, 2, 1, 0),
                                                                            (2, 2, 1, 1)]
    assert all(r["backend"] == "gloo" and r["err"] < 1e-12 for r in ranks)


def test_single_process_without_launcher(tmp_path):
    (rank,) = _run([sys.executable, "-m", PROBE, str(tmp_path)], tmp_path)
    assert (rank["world"], rank["cp"], rank["dp"]) == (1, 1, 1) and rank["err"] < 1e-12
