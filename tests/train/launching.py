"""Launching the trainer as a user does, from the tests: the environment a launch gets and
the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Rendezvous variables an earlier in-process test may have left behind; a launch that
# inherited them would try to join that (gone) process group.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(nproc: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable  # launch/torchrun.sh's interpreter
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    env.update(extra)
    return env


def torchrun_command(config: str, overrides: list[str], *launcher_args: str) -> list[str]:
    return ["bash", str(ROOT / "launch" / "torchrun.sh"), *launcher_args, "--config", config,
            *overrides]
