"""Draw a run's loss curve (and eval loss) from its metrics.jsonl as a PNG.

    python tools/plot_metrics.py runs/quickstart            # -> runs/quickstart/loss.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no rows yet")
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    ax.plot(*zip(*train, strict=True), label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(str(run_dir), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = out or run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = p.parse_args(argv)
    try:
        print(plot(args.run_dir, args.out))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
