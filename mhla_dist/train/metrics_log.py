"""Metrics: one JSON row per logged step in `metrics.jsonl`, wandb, and a console line.

Rank 0 also shows a progress bar with the loss when its stderr is a terminal. Only rank 0
logs; the other ranks (and runs with logging off) get `NullLogger`, which has
the same methods, so the training loop never asks whether logging is on. wandb runs in the
mode the config gives (`offline` by default: nothing needs a network) with a run id
stored in the run directory, so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import uuid
from pathlib import Path

log = logging.getLogger("mhla_dist.train")


class NullLogger:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def progress(self, step: int, total: int, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_mode: str, project: str, name: str | None,
                 config: dict) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.bar = None
        if sys.stderr.isatty():  # a live bar for people; log lines for files and CI
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(),
                                TextColumn("{task.completed}/{task.total} {task.description}"),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=None)
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_run_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb = wandb.init(mode=wandb_mode, project=project, name=name,
                                    id=id_file.read_text().strip(), resume="allow",
                                    dir=str(run_dir), config=config)

    def progress(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, description=f"loss {loss:.4f}")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        log.info("step %d: %s", step, shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
