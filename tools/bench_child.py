"""Running one benchmark measurement in a fresh child process (the bench scripts'
`--child SPEC` mode): peak memory is then the child's own, and on CPU glibc keeps its
freed memory (`MALLOC_ENV`), so a step does not time the allocator page-faulting its
buffers in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
ROOT = Path(__file__).resolve().parents[1]


def run_child(module: str, spec: dict, timeout: float) -> dict:
    """`python -m MODULE --child JSON(spec)`'s last stdout line, parsed; on a timeout, a
    kill (the OOM killer's SIGKILL) or an error, `{"status": why}` instead."""
    env = dict(os.environ, **(MALLOC_ENV if spec["device"] == "cpu" else {}))
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    if out.returncode != 0:
        if out.returncode < 0:
            return {"status": f"killed (signal {-out.returncode})"}
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"error: {tail}", "stderr_tail": out.stderr[-4000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])
