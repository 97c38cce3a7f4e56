"""Perplexity by position and passkey retrieval of trained MHLA LM runs.

    python tools/eval_lm.py runs/quickstart                    # both, into runs/quickstart/eval/
    python tools/eval_lm.py runs/quickstart --perplexity --bucket 32 --per-document
    python tools/eval_lm.py runs/quickstart --passkey --lengths 128,256 --trials 20
    python tools/eval_lm.py runs/mhla --compare runs/linear runs/softmax --out runs/compare

Loads each RUN_DIR's model.safetensors and config.yaml in this one process (any training
layout: the weights are consolidated). `--perplexity` (mhla_dist/eval/perplexity.py):
the mean loss per `--bucket` positions of `--seq-len` windows (default the smallest
model.max_seq_len of the runs) over `--batches` batches of held-out shards (`--data`,
default the first run's data.eval), plain packed text by default (every position's
context is the real preceding text), or `--per-document` (positions from each document's
start, documents masked as in training). `--passkey` (mhla_dist/eval/passkey.py): greedy
retrieval of a 5-digit key hidden at each of `--depths` in prompts of `--lengths` tokens
(default half and all of max_seq_len), `--trials` keys each. Neither flag: both.

Prints a table per run and evaluation and writes to `--out` (default RUN_DIR/eval):
`perplexity_by_position.json` / `.png` (loss against position, one curve per run) and
`passkey.json` / `.png` (accuracy over length x depth, one panel per run); each JSON is
`{"runs": {run name: result}}`. Every run of `--compare` is scored on the same data,
windows and keys as the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from mhla_dist.eval.runs import load_lm, read_lm_config, single_process

log = logging.getLogger("eval_lm")


def run_labels(runs: list[Path]) -> list[str]:
    names = [r.resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def plot_perplexity(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, res in results.items():
        pts = [((b["start"] + b["stop"] - 1) / 2, b["loss"]) for b in res["buckets"]
               if b["tokens"]]
        ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=f"{label} ({res['loss']:.3f})")
    first = next(iter(results.values()))
    where = "position in document" if first["per_document"] else "position in window"
    ax.set_xlabel(f"{where} (tokens, buckets of {first['bucket']})")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"held-out loss by position, seq_len {first['seq_len']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passkey(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results) + 1, 3.5),
                             squeeze=False, layout="constrained")
    for ax, (label, res) in zip(axes[0], results.items(), strict=True):
        im = ax.imshow(res["accuracy"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
        ax.set_yticks(range(len(res["lengths"])), [str(n) for n in res["lengths"]])
        for i, row in enumerate(res["accuracy"]):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if acc > 0.5 else "white")
        ax.set_xlabel("depth")
        ax.set_ylabel("length (tokens)")
        ax.set_title(f"{label}: passkey accuracy", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_list(text: str, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"{kind.__name__}") from None


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """`{"perplexity": {label: result}, "passkey": {label: result}}` for the asked ones."""
    from mhla_dist.eval.passkey import (
        FIXED_TOKENS,
        check_passkey,
        passkey_accuracy,
        passkey_table,
    )
    from mhla_dist.eval.perplexity import (
        check_perplexity,
        held_out_batches,
        perplexity_by_position,
        perplexity_table,
    )

    runs = [args.run_dir, *args.compare]
    both = not (args.perplexity or args.passkey)
    out: dict[str, dict[str, dict]] = {}
    configs = [read_lm_config(r) for r in runs]
    max_len = min(cfg.model.max_seq_len for cfg in configs)
    if args.perplexity or both:
        data = args.data or configs[0].data.eval
        if not data:
            raise ValueError(f"{runs[0] / 'config.yaml'} has no data.eval: give the "
                             "held-out shards with --data URLS")
        seq_len = args.seq_len or max_len
        check_perplexity(bucket=args.bucket, seq_len=seq_len, max_seq_len=max_len,
                         batches=args.batches)
        out["perplexity"] = {}
    lengths = args.lengths or [n for n in (max_len // 2, max_len) if n >= FIXED_TOKENS]
    if args.passkey or (both and lengths):
        check_passkey(lengths, args.depths, args.trials, max_len)
        out["passkey"] = {}
    elif both:
        log.warning("passkey skipped: max_seq_len=%d is below the %d tokens a trial needs",
                    max_len, FIXED_TOKENS)
    with single_process():
        for label, run, cfg in zip(run_labels(runs), runs, configs, strict=True):
            model = load_lm(run, cfg)  # one model at a time
            try:
                if "perplexity" in out:
                    log.info("%s: perplexity by position on %s", run, data)
                    batches = held_out_batches(data, seq_len=seq_len,
                                               batch_size=args.batch_size,
                                               vocab_size=cfg.model.vocab_size)
                    res = perplexity_by_position(
                        model, batches, seq_len=seq_len, bucket=args.bucket,
                        per_document=args.per_document, max_batches=args.batches,
                        device=args.device)
                    out["perplexity"][label] = {"run_dir": str(run), "data": data, **res}
                    print(f"{label}: {perplexity_table(res)}\n")
                if "passkey" in out:
                    log.info("%s: passkey retrieval", run)
                    res = passkey_accuracy(model, lengths=lengths, depths=args.depths,
                                           trials=args.trials, seed=args.seed,
                                           device=args.device)
                    out["passkey"][label] = {"run_dir": str(run), **res}
                    print(f"{label}: {passkey_table(res)}\n")
            except ValueError as exc:
                raise ValueError(f"{run}: {exc}") from None
            del model
    return out


def write_results(results: dict[str, dict[str, dict]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, stem, plot in (("perplexity", "perplexity_by_position", plot_perplexity),
                            ("passkey", "passkey", plot_passkey)):
        if key in results:
            (out / f"{stem}.json").write_text(json.dumps({"runs": results[key]}, indent=1))
            paths += [out / f"{stem}.json", plot(results[key], out / f"{stem}.png")]
    return paths


def main(argv: list[str] | None = None) -> int:
    from mhla_dist.eval.passkey import DEPTHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--perplexity", action="store_true", help="loss by position")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval")
    p.add_argument("--compare", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                   help="more runs, scored the same way and drawn in the same figures")
    p.add_argument("--out", type=Path, default=None, help="output folder (RUN_DIR/eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="held-out shard URLs (the run's data.eval)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="window (model.max_seq_len)")
    p.add_argument("--bucket", type=int, default=64, help="positions per bucket")
    p.add_argument("--per-document", action="store_true",
                   help="positions from each document's start, documents masked")
    p.add_argument("--lengths", type=lambda s: parse_list(s, int), default=None,
                   help="comma-separated trial lengths in tokens (max_seq_len/2, max_seq_len)")
    p.add_argument("--depths", type=lambda s: parse_list(s, float), default=list(DEPTHS),
                   help="comma-separated needle depths in [0, 1] (0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=int, default=10, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time notices
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        results = evaluate(args)
        for path in write_results(results, args.out or args.run_dir / "eval"):
            log.info("wrote %s", path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
