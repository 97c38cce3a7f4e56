"""Benchmark one training step of the MHLA language model against the same model in softmax.

    python tools/bench_train.py                       # CPU, N = 2K..32K, softmax up to 16K
    python tools/bench_train.py --ns 2048,4096 --steps 1
    python tools/bench_train.py --device cuda --dtype bf16
    python tools/bench_train.py rotary=false feature_map=elu     # any other LMConfig field

A step is what the trainer does once per batch on one process: `model.loss(tokens,
targets)` (sum, count), the mean's backward, an AdamW step, gradients zeroed. The model is
`MHLALanguageModel` built through its public constructor on one-rank process groups, so
changes to the model, its loss or its attention show up here unchanged. Default model:
2 layers, hidden 128, 4 heads of 32, SwiGLU 384, byte-level vocabulary 257 (tied head),
rotary embedding (as in configs/lm/*.yaml); MHLA with a fixed number of blocks
(`--num-blocks 32`, so C = N / 32: DESIGN "Cost", a bounded M keeps the operator linear in
N; `--block-size` fixes C instead). The baseline is the same model with every layer
softmax (`softmax_layers`: SDPA); on CPU it stops at `--softmax-max-n`, where its O(N^2)
time runs away.

Each (attention, N) point runs in a fresh child process: warm-up steps, then timed steps
(the median is reported, split into forward+backward and optimizer). Peak memory is the
resident-set high-water mark (`ru_maxrss`, CPU) or `torch.cuda.max_memory_allocated`
(GPU) above the memory after the model, its gradients and AdamW's moments exist (the
state a training step starts from), over every step; per token it divides by B x N. On
CPU the children run with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000:
otherwise glibc returns every large buffer to the OS after use and each step page-faults
its memory in again, timing the allocator rather than the model. Under `--dtype bf16` the
module is bf16 and AdamW updates fp32 master copies, as DeepSpeed's bf16 optimizer does.

At one N (`--breakdown-n`, default the largest) each child also runs hooked steps
that time the attention layers, the MLPs and the embedding + norms, forward and backward
(module hooks, synchronised on GPU), and the optimizer; head + loss is the rest of the
forward+backward (the output projection on the vocabulary, the cross-entropy, residual
adds). Where both models have a breakdown, the report adds the MHLA step without its
attention over the softmax step: the least ratio that any attention could reach there.

Prints a table, the breakdown and the issue's targets as PASS/FAIL; writes JSON, the
printed text and a PNG (default benchmarks/results/bench_train_<cpu|cuda>.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_train")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import bench_child  # noqa: E402  (the repo root first, as a script)
from tools.bench_op import device_name  # noqa: E402

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# The targets: (name, what, limit).
TARGETS = (
    ("mhla_step_32k_over_8k", "MHLA step time at 32K / at 8K", 4.5),
    ("mhla_peak_per_token_32k_over_8k", "MHLA peak memory per token at 32K / at 8K", 1.2),
    ("mhla_over_softmax_step_16k", "MHLA step time / softmax step time at 16K", 0.1),
)


# ---------------------------------------------------------------- child: one measurement
def lm_config(spec: dict):
    """The `LMConfig` of one point: `max_seq_len = N`, every layer softmax for the
    baseline."""
    from mhla_dist.config import LMConfig

    n, layers = spec["n"], spec["layers"]
    blocks = dict(block_size=spec["block_size"]) if spec["block_size"] else dict(
        num_blocks=spec["num_blocks"])
    fields = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_layers=layers,
                  num_heads=spec["heads"], head_dim=spec["head_dim"], max_seq_len=n,
                  rotary=True, **blocks)
    fields.update(spec["overrides"])
    if spec["attention"] == "softmax":
        fields["softmax_layers"] = list(range(layers))
    return LMConfig(**fields)


def measure(spec: dict) -> dict:
    """One point in this fresh process: peak memory over every step, median step time,
    and (with `spec["with_breakdown"]`) the per-module breakdown of further steps."""
    import torch

    from mhla_dist.convert.model_spec import single_rank_groups
    from mhla_dist.model.lm import MHLALanguageModel
    from tools.peak_memory import PeakMemory

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(spec["seed"])
    with single_rank_groups() as group:
        model = MHLALanguageModel(lm_config(spec), tp_group=group, cp_group=group)
        model.to(device=device, dtype=dtype).train()
        params = [p for p in model.parameters() if p.requires_grad]
        # bf16: the module is bf16, AdamW updates fp32 masters (DeepSpeed's bf16 optimizer)
        masters = ([p.detach().float().clone() for p in params]
                   if dtype != torch.float32 else params)
        opt = torch.optim.AdamW(masters, lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        for p in {id(x): x for x in params + masters}.values():
            p.grad = torch.zeros_like(p)
        # AdamW's moments exist before the steps (a step at lr 0 changes no weight)
        for pg in opt.param_groups:
            pg["lr"] = 0.0
        opt.step()
        for pg in opt.param_groups:
            pg["lr"] = spec["lr"]
        gen = torch.Generator().manual_seed(spec["seed"])
        data = torch.randint(0, spec["vocab"], (spec["batch"], spec["n"] + 1), generator=gen)
        tokens, targets = data[:, :-1].to(device), data[:, 1:].to(device)

        def fwd_bwd():
            total, count = model.loss(tokens, targets)
            loss = total / count
            loss.backward()
            return loss.detach()

        def optim():
            if masters is not params:
                for m, p in zip(masters, params, strict=True):
                    m.grad.copy_(p.grad)
            opt.step()
            if masters is not params:
                with torch.no_grad():
                    torch._foreach_copy_(params, masters)
            opt.zero_grad(set_to_none=False)
            if masters is not params:
                model.zero_grad(set_to_none=False)

        def step():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = fwd_bwd()
            sync()
            t1 = time.perf_counter()
            optim()
            sync()
            return loss, t1 - t0, time.perf_counter() - t1, time.process_time() - c0

        try:
            losses, times = [], []
            with PeakMemory(spec["device"]) as mem:
                for i in range(spec["warmup"] + spec["steps"]):
                    loss, t_fb, t_opt, cpu = step()
                    losses.append(float(loss))
                    if i >= spec["warmup"]:
                        times.append((t_fb + t_opt, t_fb, t_opt, cpu))
        except (torch.cuda.OutOfMemoryError, MemoryError):
            return {"status": "oom"}
        peak = mem.peak_bytes
        tokens_n = spec["batch"] * spec["n"]
        step_s, fb_s, opt_s, cpu_s = (statistics.median(t[i] for t in times) for i in range(4))
        out = {"status": "ok", "step_ms": 1e3 * step_s, "fwd_bwd_ms": 1e3 * fb_s,
               "optimizer_ms": 1e3 * opt_s, "tokens_per_s": tokens_n / step_s,
               "step_ms_each": [1e3 * t[0] for t in times],
               # CPU time of all this process's threads: on a shared CPU it moves less than
               # the wall time does, a hint of how much other processes slowed a step
               "step_cpu_ms": 1e3 * cpu_s,
               "peak_bytes": peak, "peak_bytes_per_token": peak / tokens_n,
               "base_bytes": mem.base_bytes, "loss_first": losses[0], "loss_last": losses[-1],
               "block_size": model.cfg.block_size, "num_blocks": model.cfg.num_blocks,
               "parameters": model.num_parameters()}
        if spec.get("with_breakdown"):
            from tools.step_breakdown import breakdown

            out["breakdown"] = breakdown(model, fwd_bwd, optim, spec["steps"], sync)
        return out


# ------------------------------------------------------------------------ parent: sweep
def run_child(spec: dict, timeout: float) -> dict:
    return bench_child.run_child("tools.bench_train", spec, timeout)


def sweep(args) -> list[dict]:
    base = dict(device=args.device, dtype=args.dtype, batch=args.batch, layers=args.layers,
                hidden=args.hidden, heads=args.heads, head_dim=args.head_dim,
                vocab=args.vocab, num_blocks=args.num_blocks, block_size=args.block_size,
                overrides=args.overrides, warmup=args.warmup, steps=args.steps,
                lr=args.lr, seed=args.seed)
    rows = []
    for n in args.ns:
        for attention in ("mhla", "softmax"):
            spec = dict(base, attention=attention, n=n, with_breakdown=n == args.breakdown_n)
            if attention == "softmax" and args.softmax_max_n and n > args.softmax_max_n:
                rows.append(dict(spec, status=f"skipped (N > --softmax-max-n "
                                              f"{args.softmax_max_n})"))
                continue
            t0 = time.perf_counter()
            result = run_child(spec, args.timeout)
            rows.append({**spec, **result})
            log.info("%-8s N=%-6d %s (%.0f s)", attention, n, result.get("status"),
                     time.perf_counter() - t0)
    return rows


def find(rows, attention: str, n: int) -> dict | None:
    return next((r for r in rows if (r["attention"], r["n"], r.get("status"))
                 == (attention, n, "ok")), None)


def targets(rows) -> dict:
    """The issue's targets: each ratio, its limit, and whether it was met; `value` is None
    where the sweep did not measure both points."""
    m8, m16, m32 = (find(rows, "mhla", n) for n in (8192, 16384, 32768))
    s16 = find(rows, "softmax", 16384)
    values = {
        "mhla_step_32k_over_8k": (m32["step_ms"] / m8["step_ms"]) if m8 and m32 else None,
        "mhla_peak_per_token_32k_over_8k": (
            m32["peak_bytes_per_token"] / m8["peak_bytes_per_token"]) if m8 and m32 else None,
        "mhla_over_softmax_step_16k": (m16["step_ms"] / s16["step_ms"]) if m16 and s16
        else None,
    }
    return {key: {"what": what, "value": values[key], "limit": limit,
                  "met": None if values[key] is None else values[key] <= limit}
            for key, what, limit in TARGETS}


def table(rows) -> str:
    head = (f"{'attention':<10}{'N':>7}{'C':>7}{'M':>5}{'step ms':>11}{'fwd+bwd':>10}"
            f"{'optim':>8}{'tokens/s':>10}{'peak MiB':>10}{'KiB/token':>11}  status")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["n"], r["attention"])):
        if r.get("status") == "ok":
            c, m = (("-", "-") if r["attention"] == "softmax"
                    else (r["block_size"], r["num_blocks"]))
            cells = (f"{c:>7}{m:>5}{r['step_ms']:>11.1f}{r['fwd_bwd_ms']:>10.1f}"
                     f"{r['optimizer_ms']:>8.1f}{r['tokens_per_s']:>10.0f}"
                     f"{r['peak_bytes'] / 2**20:>10.1f}{r['peak_bytes_per_token'] / 1024:>11.2f}")
        else:
            cells = f"{'-':>7}{'-':>5}" + "".join(f"{'-':>{w}}" for w in (11, 10, 8, 10, 10, 11))
        lines.append(f"{r['attention']:<10}{r['n']:>7}{cells}  {r.get('status')}")
    return "\n".join(lines)


def breakdown_table(row: dict) -> str:
    b = row["breakdown"]
    who = "MHLA" if row["attention"] == "mhla" else "softmax"
    lines = [f"where the {who} step goes at N={row['n']} (median of {b['steps']} hooked steps, "
             f"{b['total_ms']:.1f} ms; untimed step {row['step_ms']:.1f} ms)",
             f"{'part':<17}{'ms':>9}{'share':>8}{'forward':>10}{'backward':>10}"]
    for name, p in b["parts"].items():
        fb = (f"{p['forward_ms']:>10.1f}{p['backward_ms']:>10.1f}" if "forward_ms" in p
              else "")
        lines.append(f"{name:<17}{p['ms']:>9.1f}{100 * p['fraction']:>7.1f}%{fb}")
        if "projections_ms" in p:
            lines.append(f"{'  projections':<17}{p['projections_ms']:>9.1f}  (of the {name})")
    return "\n".join(lines)


def without_attention(mhla: dict, softmax: dict) -> dict:
    """What the MHLA step costs besides its attention layers (MLP, embedding + norms, head +
    loss, optimizer: work the softmax model does too), against the whole softmax step at the
    same N: the MHLA/softmax ratio that attention costing nothing would give."""
    parts = mhla["breakdown"]["parts"]
    rest = sum(p["ms"] for name, p in parts.items() if name != "attention")
    proj = parts["attention"]["projections_ms"]
    return {"n": mhla["n"], "mhla_without_attention_ms": rest,
            "softmax_step_ms": softmax["step_ms"], "ratio": rest / softmax["step_ms"],
            "attention_projections_ms": proj,
            "ratio_with_projections": (rest + proj) / softmax["step_ms"]}


def floor_line(floor: dict) -> str:
    return (f"without its attention the MHLA step at N={floor['n']} would take "
            f"{floor['mhla_without_attention_ms']:.1f} ms = {floor['ratio']:.3f} of the softmax "
            f"step ({floor['softmax_step_ms']:.1f} ms): the least MHLA/softmax ratio reachable "
            f"there by attention work alone; with the attention's projections "
            f"({floor['attention_projections_ms']:.1f} ms) it is "
            f"{floor['ratio_with_projections']:.3f}")


def target_lines(found: dict) -> str:
    lines = []
    for key, t in found.items():
        if t["value"] is None:
            lines.append(f"SKIP {key}: not measured ({t['what']}, limit {t['limit']})")
        else:
            verdict = "PASS" if t["met"] else "FAIL"
            lines.append(f"{verdict} {key}: {t['value']:.3f} (limit {t['limit']}; {t['what']})")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = next((r for r in rows if "breakdown" in r and r["attention"] == "mhla"), None)
    fig, axes = plt.subplots(1, 3 if detail else 2, figsize=(15 if detail else 10, 4.5))
    for attention in ("mhla", "softmax"):
        pts = sorted((r["n"], r["step_ms"], r["peak_bytes_per_token"] / 1024) for r in rows
                     if r["attention"] == attention and r.get("status") == "ok")
        if pts:
            n, ms, kib = zip(*pts, strict=True)
            axes[0].plot(n, ms, marker="o", label=attention)
            axes[1].plot(n, kib, marker="o", label=attention)
    for ax, ylabel in zip(axes[:2], ("training step (ms)", "peak memory per token (KiB)"),
                          strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N (batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_ylim(bottom=0)
    if detail:
        parts = detail["breakdown"]["parts"]
        axes[2].barh(list(parts), [p["ms"] for p in parts.values()])
        axes[2].invert_yaxis()
        axes[2].set_xlabel(f"ms of the MHLA step at N={detail['n']}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (an LMConfig field)")
    return key, yaml.safe_load(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", type=_override, metavar="KEY=VALUE",
                   help="other LMConfig fields of both models (rotary=false, ...)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")],
                   default=[2048, 4096, 8192, 16384, 32768], help="tokens per step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    p.add_argument("--vocab", type=int, default=257, help="default byte-level (257)")
    p.add_argument("--num-blocks", type=int, default=32, help="MHLA blocks M at every N")
    p.add_argument("--block-size", type=int, default=None,
                   help="a fixed block size C instead of --num-blocks (M then grows with N)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (the first steps at 32K still grow the heap)")
    p.add_argument("--steps", type=int, default=3, help="timed steps; the median is kept")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--softmax-max-n", type=int, default=None,
                   help="skip the softmax model above this N (default 16384 on CPU, none "
                        "on CUDA; 0: none)")
    p.add_argument("--breakdown-n", type=int, default=None,
                   help="N of the MHLA step breakdown (default the largest; 0: none)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (.txt and .png beside it); a folder takes the default name")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.overrides = dict(args.overrides)
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    cuda = args.device.startswith("cuda")
    if args.softmax_max_n is None:
        args.softmax_max_n = 0 if cuda else 16384
    if args.breakdown_n is None:
        args.breakdown_n = max(args.ns)
    elif args.breakdown_n and args.breakdown_n not in args.ns:
        p.error(f"--breakdown-n {args.breakdown_n} is not one of --ns {args.ns}")
    name = f"bench_train_{'cuda' if cuda else 'cpu'}.json"
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / name
    elif args.out.is_dir() or not args.out.suffix:
        args.out = args.out / name
    if cuda and not args.child:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def check_configs(args) -> dict:
    """Validate both models' configs at every N before any child runs; their resolved
    fields at the largest N, for the report."""
    from dataclasses import asdict

    from mhla_dist.config import Config, resolve_lm, validate

    out = {}
    for attention in ("mhla", "softmax"):
        for n in sorted(args.ns):
            cfg = lm_config(dict(vars(args), attention=attention, n=n))
            validate(Config(model=cfg))
        out[attention] = asdict(resolve_lm(cfg))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mhla_dist.config import ConfigError

    try:
        models = check_configs(args)
    except (ConfigError, TypeError) as exc:  # TypeError: a KEY=VALUE that is no field
        sys.exit(f"bench_train: error: {exc}")
    load = [os.getloadavg()[0]]
    rows = sweep(args)
    load.append(os.getloadavg()[0])
    name = device_name(args.device)
    found = targets(rows)
    detail = next((r for r in rows if "breakdown" in r and r["attention"] == "mhla"), None)
    soft = next((r for r in rows if "breakdown" in r and r["attention"] == "softmax"), None)
    floor = without_attention(detail, soft) if detail and soft else None
    m = models["mhla"]
    blocks = (f"C = {args.block_size}" if args.block_size
              else f"M = {args.num_blocks} blocks (C = N / {args.num_blocks})")
    header = [f"one training step (forward, backward, AdamW), batch {args.batch}, "
              f"{args.dtype}, {name}", f"{m['num_layers']} layers, hidden {m['hidden_size']}, "
              f"{m['num_heads']} heads x {m['head_dim']}, ffn {m['ffn_hidden_size']}, vocab "
              f"{m['vocab_size']}, rotary {m['rotary']}; MHLA {blocks}, {m['feature_map']}"]
    if args.device == "cpu" and max(load) > (os.cpu_count() or 1):
        header.append(f"note: load average {max(load):.1f} on {os.cpu_count()} cores during "
                      "the sweep: other processes shared the CPU, the times are noisy")
    text = "\n".join(
        header + [table(rows), ""]
        + [breakdown_table(r) + "\n" for r in (detail, soft) if r]
        + ([floor_line(floor), ""] if floor else [])
        + [target_lines(found)])
    print(text)
    report = {
        "device": name, "device_kind": args.device, "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "env": bench_child.MALLOC_ENV if args.device == "cpu" else {}, "load_average": load,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "child"},
        "models": models, "targets": found,
        "breakdown": {"n": detail["n"], **detail["breakdown"]} if detail else None,
        "softmax_breakdown": {"n": soft["n"], **soft["breakdown"]} if soft else None,
        "without_attention": floor,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".txt").write_text(text + "\n")
    png = args.out.with_suffix(".png")
    plot(rows, png, f"LM training step, MHLA vs softmax, {m['num_layers']} layers hidden "
                    f"{m['hidden_size']}, batch {args.batch}, {args.dtype}, {name}")
    print(f"wrote {args.out}, {args.out.with_suffix('.txt').name} and {png.name}")


if __name__ == "__main__":
    main()
