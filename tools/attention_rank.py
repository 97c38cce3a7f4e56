"""Global context collapse, measured: rank and row entropy of a trained LM's token-level
attention matrices, MHLA (its Mc) against plain linear attention on the same q, k.

    python tools/attention_rank.py runs/quickstart                 # -> runs/quickstart/eval/
    python tools/attention_rank.py RUN_DIR --layers 0,1 --heads all --tokens 256 --windows 4
    python tools/attention_rank.py RUN_DIR --text notes.txt --out /tmp/rank

Input: `--text FILE`, else `--data URLS` (token shards), else the run's `data.eval`.
Prints a table (layer, head, kind, numerical rank, effective rank of the operator matrix
and of its rows scaled to unit mass, mean row entropy in nats, its uniform maximum
log(t + 1), their ratio; averaged over the windows), writes attention_rank.json and
attention_rank.png (effective rank and entropy ratio per layer and head) to --out (default
RUN_DIR/eval/). Softmax layers of a hybrid model show up as `softmax` rows for reference
(`--layers mhla` leaves them out). Metrics: `mhla_dist/eval/attention_rank.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

log = logging.getLogger("attention_rank")

COLORS = {"mhla": "tab:blue", "linear": "tab:orange", "softmax": "tab:gray"}


def table(result: dict) -> str:
    head = (f"{'layer':>5} {'head':>4} {'kind':<7} {'rank':>7} {'eff.rank':>9} "
            f"{'(rows)':>7} {'entropy':>8} {'max':>6} {'ratio':>6}")
    lines = [f"{result['run_dir']}: {result['windows']} window(s) of {result['tokens']} "
             f"tokens, {result['num_blocks']} blocks, head_dim {result['head_dim']}, "
             f"normalize={result['normalize']}", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['layer']:>5} {r['head']:>4} {r['kind']:<7} {r['rank']:>7.1f} "
                     f"{r['effective_rank']:>9.2f} {r['effective_rank_rows']:>7.2f} "
                     f"{r['row_entropy']:>8.3f} "
                     f"{r['max_entropy']:>6.3f} {r['entropy_ratio']:>6.3f}")
    for kind, s in result["summary"].items():
        lines.append(f"mean {kind:<7} effective rank {s['effective_rank']:.2f} "
                     f"(rows {s['effective_rank_rows']:.2f}), "
                     f"entropy ratio {s['entropy_ratio']:.3f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = sorted({(r["layer"], r["head"]) for r in rows})
    kinds = [k for k in COLORS if any(r["kind"] == k for r in rows)]
    width = 0.8 / len(kinds)
    fig, axes = plt.subplots(2, 1, figsize=(min(40, max(6, 0.4 * len(groups) + 2)), 6),
                             sharex=True)
    for ax, metric, label in zip(axes, ("effective_rank", "entropy_ratio"),
                                 ("effective rank", "row entropy / max"), strict=True):
        for j, kind in enumerate(kinds):
            got = {(r["layer"], r["head"]): r[metric] for r in rows if r["kind"] == kind}
            xs = [g for g, key in enumerate(groups) if key in got]
            ax.bar([x + (j - (len(kinds) - 1) / 2) * width for x in xs],
                   [got[groups[x]] for x in xs], width, label=kind, color=COLORS[kind])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[0].set_title(f"{result['run_dir']}: {result['tokens']} tokens, "
                      f"{result['num_blocks']} blocks", fontsize=9)
    axes[1].set_xticks(range(len(groups)), [f"L{l}.h{h}" for l, h in groups],
                       rotation=90 if len(groups) > 16 else 0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--layers", default="all", help="all | mhla | comma-separated indices")
    p.add_argument("--heads", default="all", help="all | comma-separated indices")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per window (default min(256, model.max_seq_len))")
    p.add_argument("--windows", type=int, default=1, help="windows to average over")
    p.add_argument("--data", default=None, help="token shard URLs (default: data.eval)")
    p.add_argument("--text", type=Path, default=None, help="a text file instead of shards")
    p.add_argument("--tokenizer", default="byte", help="for --text: byte | tokenizer.json")
    p.add_argument("--tol", type=float, default=1e-6,
                   help="numerical rank: singular values above tol * s_max")
    p.add_argument("--out", type=Path, default=None, help="default RUN_DIR/eval/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("attention_rank", "mhla_dist"):  # not megatron's chatter
        logging.getLogger(name).setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning)
    from mhla_dist.eval.attention_rank import analyse_run

    try:
        result = analyse_run(args.run_dir, layers=args.layers, heads=args.heads,
                             tokens=args.tokens, windows=args.windows, data=args.data,
                             text=args.text, tokenizer=args.tokenizer, tol=args.tol)
        out = args.out or args.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_rank.json").write_text(json.dumps(result, indent=1))
        png = plot(result, out / "attention_rank.png")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    log.info("wrote %s and %s", out / "attention_rank.json", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
