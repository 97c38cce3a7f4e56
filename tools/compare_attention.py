"""MHLA against linear, block-local, softmax and hybrid attention on MQAR, at equal model size.

    python tools/compare_attention.py --quick          # smoke run: 64x4, width 64, 2 variants
    python tools/compare_attention.py                  # the full grid (hours on a CPU)
    python tools/compare_attention.py --points 128x8 --variants mhla,softmax --steps 4000
    python tools/compare_attention.py --jobs 4 --out /tmp/cmp   # 4 runs at a time

Every run is the trainer on the MQAR preset of its point (`configs/eval/mqar_{L}x{K}.yaml`:
sequences of L tokens with K key-value pairs) in its own process,
`python -m mhla_dist.train --config PRESET run_dir=RUNS/<name> ...`, with the attention
variant as config overrides:

- `mhla`: the preset as is (its `block_size`, so M = L / block_size blocks; `--blocks M`
  sets `block_size = L / M` at every point instead).
- `mhla-mc10`: the same with Mc's learning rate 10x the others' (`optim.mixing_lr_scale`):
  at initialisation MHLA computes linear attention (DESIGN §1's row average, undone by the
  output norm) and departs from it only as Mc learns.
- `mhla-mc0.1`: Mc's learning rate a tenth of the others'. Adam moves every weight by about
  the learning rate per step whatever its scale, and the row average's entries are 1/i:
  at 1e-3, an entry of 1/16 can double in ~60 steps.
- `linear`: plain causal linear attention, one block (`model.block_size = L`, M = 1).
- `block-local`: Mc the identity and frozen (`model.mixing_init=identity
  optim.mixing_lr_scale=0`): each block attends only to itself.
- `softmax`: SDPA in every layer (`model.softmax_layers=[0, ..., num_layers - 1]`).
- `hybrid`: SDPA in one layer of four (indices i with i % 4 == 3), MHLA elsewhere; a
  model of fewer than four layers gets SDPA in its last layer (the report says so).

Widths (`model.hidden_size`) keep the preset's head dim (32): `model.num_heads =
width / head_dim`, so a wider model has more heads of the same size and every variant's
attention reads the same head shape. `train.seed` sets the initialisation; the data
(`data.seed`) and so the eval set are the same sequences in every run. A run trains
`--steps` steps (the preset's schedule, warmup min(100, steps / 10)) and evaluates at the end
(`train.eval_interval = steps`, or every `--eval-interval` steps: the final eval counts,
the best one is kept beside it).

A run whose `metrics.jsonl` already holds its final eval, trained with the same overrides,
is not trained again (an interrupted sweep resumes; `--force` redoes it). The trainer
always saves a checkpoint and `model.safetensors` at the end; they are deleted after the
run unless `--keep-weights`. Children run with the CPU's default thread count under
`--jobs 1` (the default); with `--jobs J` each gets OMP_NUM_THREADS = cores / J unless
the environment sets it.

Prints, per point and width, the best final `eval_accuracy` of each variant over the lr
sweep (mean over seeds; which lr), then every run; writes JSON, the printed text and a
PNG of grouped bars (default benchmarks/results/compare_attention_<cpu|cuda>.*, `--quick`:
compare_attention_quick_<dev>.*; run directories under OUT/runs unless `--runs-dir`).

Cost on 2 idle CPU cores (measured): ~7 s to start a run, then a training step of ~0.05 s
(64x4, width 64) to ~0.3 s (256x16, width 128), about the same for every variant at these
lengths; `--quick` takes under a minute, the default grid (60 runs of 2000 steps) ~5 h.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("compare_attention")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root first, as a script

VARIANTS = ("mhla", "mhla-mc10", "mhla-mc0.1", "linear", "block-local", "softmax", "hybrid")
MC_LR_SCALES = {"mhla-mc10": 10.0, "mhla-mc0.1": 0.1}  # Mc's learning rate over the others'
PRESETS = ROOT / "configs" / "eval"
# A child must be a world of one: a launcher's (or an earlier test's) variables would make
# it wait for peers, and two children would share a port.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
RUN_FILE = "compare_run.json"  # in each run directory: its overrides, status and wall time


# ------------------------------------------------------------------------ the grid
def parse_point(text: str) -> tuple[int, int]:
    """`"64x4"` -> `(seq_len 64, kv pairs 4)`."""
    seq, sep, pairs = text.partition("x")
    if not (sep and seq.isdigit() and pairs.isdigit()):
        raise argparse.ArgumentTypeError(f"point {text!r} is not SEQxPAIRS, e.g. 64x4")
    return int(seq), int(pairs)


def hybrid_layers(num_layers: int) -> tuple[list[int], str | None]:
    """The softmax layers of the hybrid (one in four: i % 4 == 3), and a note when the
    model is too shallow for that and its last layer is used instead."""
    layers = [i for i in range(num_layers) if i % 4 == 3]
    if layers:
        return layers, None
    return [num_layers - 1], (f"hybrid: {num_layers} layer(s) < 4, so the last layer "
                              f"({num_layers - 1}) is softmax instead of one in four")


def variant_overrides(variant: str, *, num_layers: int, seq_len: int,
                      block_size: int) -> list[str]:
    """The config overrides that turn the MQAR preset's MHLA model into `variant`;
    `block_size` is the MHLA block of the mhla, block-local and hybrid variants."""
    blocks = [f"model.block_size={block_size}", "model.num_blocks=null"]
    if variant == "mhla":
        return blocks
    if variant in MC_LR_SCALES:
        return blocks + [f"optim.mixing_lr_scale={MC_LR_SCALES[variant]:g}"]
    if variant == "linear":
        return [f"model.block_size={seq_len}", "model.num_blocks=null"]
    if variant == "block-local":
        return blocks + ["model.mixing_init=identity", "optim.mixing_lr_scale=0"]
    if variant == "softmax":
        return blocks + [f"model.softmax_layers=[{','.join(map(str, range(num_layers)))}]"]
    if variant == "hybrid":
        layers, _ = hybrid_layers(num_layers)
        return blocks + [f"model.softmax_layers=[{','.join(map(str, layers))}]"]
    raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")


def preset(seq_len: int, pairs: int) -> tuple[Path, object]:
    """The MQAR preset of a point and its resolved model + data config."""
    from mhla_dist.config import load_config

    path = PRESETS / f"mqar_{seq_len}x{pairs}.yaml"
    if not path.is_file():
        have = sorted((p.stem.removeprefix("mqar_") for p in PRESETS.glob("mqar_*.yaml")),
                      key=lambda name: parse_point(name))
        raise ValueError(f"point {seq_len}x{pairs} has no preset {path.relative_to(ROOT)}; "
                         f"presets: {', '.join(have)}")
    cfg = load_config(path)
    if (cfg.model.max_seq_len, cfg.data.num_kv_pairs) != (seq_len, pairs):
        raise ValueError(f"{path.name} holds max_seq_len={cfg.model.max_seq_len}, "
                         f"num_kv_pairs={cfg.data.num_kv_pairs}, not {seq_len}x{pairs}")
    return path, cfg


def plan(args) -> list[dict]:
    """Every run of the grid (point, width, variant, lr, seed) with its overrides."""
    runs = []
    for seq_len, pairs in args.points:
        path, cfg = preset(seq_len, pairs)
        layers = args.layers or cfg.model.num_layers
        if args.blocks and seq_len % args.blocks:
            raise ValueError(f"--blocks {args.blocks} does not divide seq_len {seq_len}")
        block = seq_len // args.blocks if args.blocks else cfg.model.block_size
        head_dim = cfg.model.head_dim  # the preset's (32), kept at every width
        bad = [w for w in args.widths if w % head_dim or w < head_dim]
        if bad:
            raise ValueError(f"widths {bad} are not multiples of {path.name}'s head dim "
                             f"{head_dim}")
        common = [f"model.num_layers={layers}", f"train.steps={args.steps}",
                  f"schedule.warmup_steps={min(100, args.steps // 10)}",
                  f"train.eval_interval={args.eval_interval or args.steps}",
                  *([f"train.eval_steps={args.eval_steps}"] if args.eval_steps else []),
                  "logging.wandb.mode=disabled", "checkpoint.interval=0", "resume=none"]
        for width, variant, lr, seed in itertools.product(args.widths, args.variants,
                                                          args.lrs, args.seeds):
            point = f"{seq_len}x{pairs}"
            runs.append(dict(
                name=f"{point}-{variant}-w{width}-lr{lr:g}-seed{seed}-{args.steps}steps",
                point=point, seq_len=seq_len, kv_pairs=pairs, width=width,
                heads=width // head_dim, layers=layers, variant=variant, lr=lr, seed=seed,
                steps=args.steps, batch=cfg.data.micro_batch_size,
                preset=str(path.relative_to(ROOT)),
                num_blocks={"softmax": None, "linear": 1}.get(variant, seq_len // block),
                overrides=[f"model.hidden_size={width}", f"model.num_heads={width // head_dim}",
                           f"optim.lr={lr}", f"train.seed={seed}", *common,
                           *variant_overrides(variant, num_layers=layers, seq_len=seq_len,
                                              block_size=block)]))
    return runs


def check_runs(runs: list[dict]) -> None:
    """Validate every run's config before any trains (a typo fails in a second, not after
    an hour of sweep)."""
    from mhla_dist.config import ConfigError, load_config

    for run in runs:
        try:
            load_config(ROOT / run["preset"], run["overrides"])
        except ConfigError as exc:
            raise ValueError(f"run {run['name']}: {exc}") from None


# ------------------------------------------------------------------------ one run
def read_metrics(run_dir: Path, steps: int) -> dict | None:
    """The final eval (at `steps`) and the best eval of a run directory; None when the
    final eval is not there (the run has not finished)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_accuracy" in r]
    final = next((r for r in reversed(evals) if r["step"] == steps), None)
    if final is None:
        return None
    best = max(evals, key=lambda r: float(r["eval_accuracy"]))
    rates = sorted(r["samples_per_s"] for r in rows if isinstance(r.get("samples_per_s"), float))
    return {"eval_accuracy": float(final["eval_accuracy"]),
            "eval_loss": float(final["eval_loss"]),
            "best_eval_accuracy": float(best["eval_accuracy"]), "best_eval_step": best["step"],
            "evals": [{k: r[k] for k in ("step", "eval_loss", "eval_accuracy")} for r in evals],
            "final_train_loss": final.get("loss"),
            "samples_per_s": rates[len(rates) // 2] if rates else None}


def child_env(jobs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_child(cmd: list[str], log_path: Path, env: dict,
              timeout: float) -> tuple[int | None, float, float]:
    """Run `cmd` with its output into `log_path`: (exit code, None after a timeout; wall
    seconds; CPU seconds of the child's threads, user + system: on a shared CPU they move
    far less than the wall time)."""
    killed = threading.Event()
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return (None if killed.is_set() else proc.returncode), wall, usage.ru_utime + usage.ru_stime


def train(run: dict, runs_dir: Path, *, force: bool, keep_weights: bool, jobs: int,
          timeout: float) -> dict:
    """Train one run in a child process (or reuse its finished result)."""
    run_dir = runs_dir / run["name"]
    record = run_dir / RUN_FILE
    done = read_metrics(run_dir, run["steps"])
    if done and not force and record.is_file():
        old = json.loads(record.read_text())
        if old.get("overrides") == run["overrides"] and old.get("status") == "ok":
            log.info("%-44s reused (final eval in %s)", run["name"], run_dir)
            return {**run, **done, "status": "ok", "reused": True, "wall_s": old.get("wall_s"),
                    "cpu_s": old.get("cpu_s")}
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start it afresh
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "mhla_dist.train", "--config", run["preset"],
           f"run_dir={run_dir}", *run["overrides"]]
    record.write_text(json.dumps({"overrides": run["overrides"], "command": cmd,
                                  "status": "running"}, indent=1))
    rc, wall, cpu = run_child(cmd, run_dir / "train.log", child_env(jobs), timeout)
    result = read_metrics(run_dir, run["steps"])
    if rc is None:
        status = f"timeout ({timeout:.0f} s)"
    elif rc or result is None:
        lines = (run_dir / "train.log").read_text().strip().splitlines() or ["?"]
        status = f"error (exit {rc}): {lines[-1][-300:]}"
    else:
        status = "ok"
    if status == "ok" and not keep_weights:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for name in ("model.safetensors", "model_config.json"):
            (run_dir / name).unlink(missing_ok=True)
    record.write_text(json.dumps({"overrides": run["overrides"], "command": cmd,
                                  "status": status, "wall_s": wall, "cpu_s": cpu}, indent=1))
    acc = f"accuracy {result['eval_accuracy']:.3f}" if result else "-"
    log.info("%-44s %s, %s (%.0f s, %.0f CPU s)", run["name"], status, acc, wall, cpu)
    return {**run, **(result or {}), "status": status, "reused": False, "wall_s": wall,
            "cpu_s": cpu, "log": str(run_dir / "train.log")}


def sweep(runs: list[dict], args) -> list[dict]:
    def one(run):
        return train(run, args.runs_dir, force=args.force, keep_weights=args.keep_weights,
                     jobs=args.jobs, timeout=args.timeout)

    if args.jobs == 1:
        return [one(r) for r in runs]
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one, runs))


# ------------------------------------------------------------------------ the report
def device_name(kind: str) -> str:
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def summarise(rows: list[dict]) -> list[dict]:
    """Per point, width and variant: the mean final accuracy over seeds at each lr, and
    the best lr."""
    groups: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        by_lr = groups.setdefault((r["point"], r["width"], r["variant"]), {})
        if r["status"] == "ok":
            by_lr.setdefault(r["lr"], []).append(r["eval_accuracy"])
    out = []
    for (point, width, variant), by_lr in groups.items():
        means = {lr: sum(a) / len(a) for lr, a in by_lr.items()}
        best = max(means, key=means.get) if means else None
        out.append({"point": point, "width": width, "variant": variant,
                    "best_accuracy": means.get(best), "best_lr": best,
                    "accuracy_by_lr": {f"{lr:g}": m for lr, m in means.items()},
                    "seeds_by_lr": {f"{lr:g}": len(a) for lr, a in by_lr.items()}})
    return out


def summary_table(summary: list[dict], variants: list[str]) -> str:
    cells = {(s["point"], s["width"], s["variant"]): s for s in summary}
    groups = list(dict.fromkeys((s["point"], s["width"]) for s in summary))
    head = f"{'point':<8}{'width':>6}" + "".join(f"{v:>17}" for v in variants)
    lines = ["best final eval_accuracy over the lr sweep (its lr)", head, "-" * len(head)]
    for point, width in groups:
        row = f"{point:<8}{width:>6}"
        for v in variants:
            s = cells.get((point, width, v))
            text = (f"{s['best_accuracy']:.3f} ({s['best_lr']:g})"
                    if s and s["best_accuracy"] is not None else "-")
            row += f"{text:>17}"
        lines.append(row)
    return "\n".join(lines)


def runs_table(rows: list[dict]) -> str:
    head = (f"{'point':<8}{'width':>6}{'variant':>12}{'lr':>8}{'seed':>5}{'M':>4}{'acc':>7}"
            f"{'best':>7}{'eval_loss':>10}{'steps/s':>9}{'wall s':>8}{'CPU s':>7}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "ok":
            rate = (f"{r['samples_per_s'] / r['batch']:>9.1f}" if r.get("samples_per_s")
                    else f"{'-':>9}")
            nums = (f"{r['eval_accuracy']:>7.3f}{r['best_eval_accuracy']:>7.3f}"
                    f"{r['eval_loss']:>10.4f}{rate}")
        else:
            nums = f"{'-':>7}{'-':>7}{'-':>10}{'-':>9}"
        wall = "".join(f"{r[k]:>{w}.0f}" if r.get(k) is not None else f"{'-':>{w}}"
                       for k, w in (("wall_s", 8), ("cpu_s", 7)))
        status = "ok (reused)" if r.get("reused") else r["status"]
        lines.append(f"{r['point']:<8}{r['width']:>6}{r['variant']:>12}{r['lr']:>8g}"
                     f"{r['seed']:>5}{r['num_blocks'] or '-':>4}{nums}{wall}  {status}")
    return "\n".join(lines)


def plot(summary: list[dict], variants: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((s["point"], s["width"]) for s in summary))
    cells = {(s["point"], s["width"], s["variant"]): s for s in summary}
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.35 * len(groups) * len(variants)), 4))
    for i, v in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        accs = [(cells.get((*grp, v)) or {}).get("best_accuracy") for grp in groups]
        bars = ax.bar(xs, [a or 0.0 for a in accs], width, label=v)
        ax.bar_label(bars, labels=["-" if a is None else f"{a:.2f}" for a in accs],
                     fontsize=6)
    ax.set_xticks(range(len(groups)), [f"{p}\nwidth {w}" for p, w in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("MQAR eval accuracy (best lr)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(variants), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.2))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ CLI
def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _variants(text: str) -> list[str]:
    out = [v for v in text.split(",") if v]
    bad = [v for v in out if v not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"variant(s) {bad} not among {', '.join(VARIANTS)}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=_list(parse_point), default=None,
                   help="SEQxPAIRS MQAR presets (default 64x4,128x8,256x16)")
    p.add_argument("--widths", type=_list(int), default=None,
                   help="model.hidden_size values, multiples of 32 (default 64,128)")
    p.add_argument("--lrs", type=_list(float), default=None, help="default 1e-3,3e-3")
    p.add_argument("--variants", type=_variants, default=None,
                   help=f"default {','.join(VARIANTS)}")
    p.add_argument("--seeds", type=_list(int), default=None, help="train.seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="train.steps (default 2000)")
    p.add_argument("--eval-interval", type=int, default=None,
                   help="steps between evals, dividing --steps (default: only at the end)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="eval batches (default the preset's)")
    p.add_argument("--layers", type=int, default=None, help="model.num_layers (default "
                   "the preset's)")
    p.add_argument("--blocks", type=int, default=None,
                   help="MHLA blocks M at every point (default the preset's block_size)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64x4, width 64, lr "
                   "3e-3, mhla and linear, 300 steps (flags given explicitly still win)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep each run's checkpoints/ and model.safetensors")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder of the JSON, text and PNG")
    p.add_argument("--runs-dir", type=Path, default=None, help="default OUT/runs")
    args = p.parse_args(argv)
    quick = dict(points=[(64, 4)], widths=[64], lrs=[3e-3], variants=["mhla", "linear"],
                 seeds=[0], steps=300)
    full = dict(points=[(64, 4), (128, 8), (256, 16)], widths=[64, 128], lrs=[1e-3, 3e-3],
                variants=list(VARIANTS), seeds=[0], steps=2000)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.jobs < 1:
        p.error(f"--steps {args.steps} and --jobs {args.jobs} must be >= 1")
    if args.eval_interval and args.steps % args.eval_interval:
        p.error(f"--eval-interval {args.eval_interval} does not divide --steps {args.steps} "
                "(the final eval must fall on the last step)")
    args.runs_dir = (args.runs_dir or args.out / "runs").resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from mhla_dist.config import ConfigError

    try:
        runs = plan(args)
        check_runs(runs)
    except (ValueError, ConfigError) as exc:
        print(f"compare_attention: error: {exc}", file=sys.stderr)
        return 2
    notes = sorted({n for r in runs if r["variant"] == "hybrid"
                    for n in [hybrid_layers(r["layers"])[1]] if n})
    log.info("%d runs into %s", len(runs), args.runs_dir)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    rows = sweep(runs, args)
    elapsed = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    summary = summarise(rows)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    name = device_name(kind)
    heads = sorted({r["width"] // r["heads"] for r in runs})
    blocks = (f"M = {args.blocks} blocks at every point" if args.blocks
              else "MHLA blocks from each preset")
    header = [f"MQAR: attention variants at equal size, {args.steps} steps, final eval, "
              f"{name}",
              f"num_heads = width / the preset's head dim ({heads}), {blocks}; "
              f"sweep {elapsed:.0f} s, the runs' own CPU time "
              f"{sum(r.get('cpu_s') or 0 for r in rows):.0f} s"]
    header += [f"note: {n}" for n in notes]
    if kind == "cpu" and max(load) > (os.cpu_count() or 1):
        header.append(f"note: load average {max(load):.1f} on {os.cpu_count()} cores: other "
                      "processes shared the CPU, wall times are noisy")
    text = "\n".join(header + ["", summary_table(summary, args.variants), "",
                               runs_table(rows)])
    print(text)
    stem = args.out / f"compare_attention{'_quick' if args.quick else ''}_{kind}"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name, "device_kind": kind, "python": platform.python_version(),
        "torch": torch.__version__, "load_average": load, "sweep_s": elapsed,
        "command": [sys.executable, *sys.argv],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "head_dims": heads, "notes": notes, "summary": summary, "runs": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".txt").write_text(text + "\n")
    plot(summary, args.variants, stem.with_suffix(".png"),
         f"MQAR accuracy by attention, {args.steps} steps, best of lr {args.lrs}")
    print(f"wrote {stem}.json, .txt and .png")
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"compare_attention: {len(failed)} run(s) failed: {', '.join(failed)} (their "
              f"train.log is in {args.runs_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
