"""Benchmark the MHLA Triton kernels against the torch backend, SDPA (flash) and fla.

    python tools/bench_kernels.py                      # full sweep on a GPU (bf16)
    python tools/bench_kernels.py --d 128 --n 16384    # a subset
    python tools/bench_kernels.py --dry-run            # tiny shapes, CPU, Triton interpreter

It first checks the fp32 kernels against the quadratic `mhla_reference` (and stops on a
mismatch); then, for every shape, the Triton output and gradients against the torch
backend in float64 (a configuration that fails is reported and not timed); then it times
forward and forward+backward. The operator
is memory-bound, so besides time it reports achieved bytes/s over the minimal traffic
(q, k, v read and o written once; backward also reads o, do and writes dq, dk, dv) and
that as a fraction of this card's device-to-device copy bandwidth, measured here with a
large tensor copy. Prints a table, writes JSON (with the GPU name) and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("bench_kernels")

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# bf16 inputs: the rounding of the inputs, of o and of every gradient. The mixing gradient
# of a normalised output is nearly orthogonal to each row of Mc (scaling a row changes
# only eps), so its two terms cancel and its relative error is larger.
CHECK_TOL = {"o": 3e-2, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2, "dmixing": 1e-1}
# fp32 inputs against the float64 quadratic reference: fp32 accumulation in other orders.
REF_TOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims (dv = d)")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 262144],
                   help="sequence lengths")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--causal", choices=["causal", "noncausal", "both"], default="both")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--sdpa-max-tokens", type=int, default=65536,
                   help="skip SDPA (quadratic) above this N")
    p.add_argument("--torch-max-tokens", type=int, default=262144,
                   help="skip the torch backend above this N")
    p.add_argument("--check-max-tokens", type=int, default=65536,
                   help="check triton against torch at every N up to this")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default: {DEFAULT_OUT_DIR}/kernels_<gpu>_<time>.json); "
                   "the PNG goes beside it")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop timing new shapes after this many seconds (0: no limit); the "
                   "JSON is rewritten after every shape, so a cut-short run keeps its rows")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the plumbing)")
    args = p.parse_args(argv)
    if args.dry_run:
        # at least 4 blocks: with 2, the normalised mixing gradient is mostly cancellation
        args.batch, args.heads, args.d, args.n, args.block_sizes = 1, 2, [16], [64], [8, 16]
    return args


def make_inputs(args, n: int, d: int, block_size: int, device, dtype, causal: bool):
    """Feature-mapped q, k (relu + eps, as the layer produces them), signed v, and a
    non-negative row-normalised mixing (lower-triangular when causal)."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, n, args.heads, d)
    q, k = (torch.relu(torch.randn(shape, device=device, generator=g)) + 1e-3 for _ in "qk")
    v = torch.randn(shape, device=device, generator=g)
    m = math.ceil(n / block_size)
    mixing = torch.rand(m, m, device=device, generator=g)
    if causal:
        mixing = mixing.tril()
    mixing = mixing / mixing.sum(-1, keepdim=True)
    return [t.to(dtype) for t in (q, k, v)] + [mixing]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_correctness(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor]) -> dict:
    """Relative errors of the output and of every gradient of `fn` against `ref_fn`."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().requires_grad_() for t in inputs]
    out, ref = fn(*leaves), ref_fn(*ref_leaves)
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, do)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    errs = {"o": rel_err(out, ref)}
    errs.update({f"d{name}": rel_err(a, b)
                 for name, a, b in zip(("q", "k", "v", "mixing"), grads, ref_grads, strict=True)})
    return errs


def timer(device: torch.device, warmup_ms: float, rep_ms: float) -> Callable[[Callable], float]:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms)

    def cpu_time(fn: Callable) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


def copy_bandwidth(device: torch.device, measure: Callable[[Callable], float]) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB tensor)."""
    numel = (1 << 30) // 4 if device.type == "cuda" else 1 << 20
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def min_bytes(args, n: int, d: int, elem: int, with_backward: bool) -> int:
    tokens = args.batch * n * args.heads
    fwd = tokens * (2 * d + 2 * d) * elem  # q, k, v read, o written (dv = d)
    bwd = tokens * (3 * d + 2 * d + 3 * d) * elem  # q, k, v, o, do read; dq, dk, dv written
    return fwd + (bwd if with_backward else 0)


def implementations(causal: bool, block_size: int) -> dict[str, Callable]:
    from mhla_kernels import mhla
    from mhla_kernels.triton_mhla import mhla_triton

    return {
        "triton": lambda q, k, v, m: mhla_triton(q, k, v, m, block_size, causal=causal),
        "torch": lambda q, k, v, m: mhla(q, k, v, m, block_size, causal=causal, backend="torch"),
    }


def baselines(device, causal: bool) -> dict[str, Callable]:
    """Block-size independent baselines: SDPA (flash) and fla's chunked linear attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v, _m):
        backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return o.transpose(1, 2)

    out = {"sdpa_flash": sdpa}
    if causal and device.type == "cuda":
        try:  # fla queries the driver at import: anything can go wrong there
            from fla.ops.linear_attn import chunk_linear_attn

            # [B, T, H, K] layout, like mhla; fla normalises by a running key sum.
            out["fla_chunk_linear"] = lambda q, k, v, _m: chunk_linear_attn(
                q, k, v, normalize=True
            )[0]
        except Exception as exc:  # noqa: BLE001
            log.warning("fla is not importable (%s): skipping flash-linear-attention", exc)
    return out


def bench_one(fn: Callable, inputs, measure, with_backward: bool) -> float:
    if not with_backward:
        with torch.no_grad():
            return measure(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_() for t in inputs]
    do = torch.randn_like(fn(*leaves))

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(do)

    return measure(step)


# The targets, all at N = 64K, H = 16, d = 64, block 256.
TARGET = dict(n=65536, d=64, block_size=256)


def reference_check(device, small: bool = False) -> list[dict]:
    """fp32 Triton output and gradients against the quadratic `mhla_reference` (small
    shapes: the reference is N x N), causal and not, a ragged last block included."""
    from mhla_kernels import mhla_reference
    from mhla_kernels.triton_mhla import mhla_triton

    args = argparse.Namespace(batch=2, heads=3)
    out = []
    for causal in (False, True):
        for n, d, c in ((40, 16, 16), (40, 8, 32)) if small else ((1000, 64, 64), (700, 32, 256)):
            inputs = make_inputs(args, n, d, c, device, torch.float32, causal)
            errs = check_correctness(
                lambda q, k, v, m, c=c, causal=causal: mhla_triton(q, k, v, m, c, causal=causal),
                lambda q, k, v, m, c=c, causal=causal: mhla_reference(
                    q.double(), k.double(), v.double(), m.double(), c, causal=causal),
                inputs)
            out.append(dict(causal=causal, n=n, d=d, block_size=c, **errs))
            log.info("reference check causal=%s N=%d d=%d C=%d: %s", causal, n, d, c,
                     " ".join(f"{k} {e:.1e}" for k, e in errs.items()))
            bad = {k: e for k, e in errs.items() if not e < REF_TOL}
            if bad:
                raise RuntimeError(f"fp32 triton differs from mhla_reference at causal={causal} "
                                   f"N={n} d={d} C={c}: {bad} (tolerance {REF_TOL})")
    return out


def ordered_shapes(args) -> list[tuple[bool, int, int]]:
    """Every (causal, d, N), the targets' shapes first (a run cut short keeps them)."""
    modes = {"causal": [True], "noncausal": [False], "both": [False, True]}[args.causal]
    shapes = [(causal, d, n) for causal in modes for d in args.d for n in args.n]
    return sorted(shapes, key=lambda s: (s[2] != TARGET["n"], s[1] != TARGET["d"]))


def targets(rows: list[dict]) -> dict:
    """The issue's three figures, where the rows hold them."""
    def find(impl, causal, mode, block_size=TARGET["block_size"]):
        for r in rows:
            if (r["impl"], r["causal"], r["mode"], r["n"], r["d"]) == (
                    impl, causal, mode, TARGET["n"], TARGET["d"]) and (
                    block_size is None or r["block_size"] == block_size):
                return r
        return None

    out = {}
    fwd = find("triton", False, "fwd")
    if fwd:
        out["noncausal_fwd_frac_copy_bw"] = dict(value=fwd["frac_copy_bw"], goal=">= 0.60")
    for causal in (False, True):
        tri, sdpa = find("triton", causal, "fwd+bwd"), find("sdpa_flash", causal, "fwd+bwd", None)
        if tri and sdpa:
            out[f"{'causal' if causal else 'noncausal'}_fwd_bwd_speedup_over_sdpa_flash"] = dict(
                value=sdpa["ms"] / tri["ms"], goal=">= 20")
    tri, fla = find("triton", True, "fwd+bwd"), find("fla_chunk_linear", True, "fwd+bwd", None)
    if tri and fla:
        out["causal_fwd_bwd_time_over_fla"] = dict(value=tri["ms"] / fla["ms"], goal="<= 1.5")
    return out


def run(args, save: Callable[[dict], None] = lambda report: None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    measure = timer(device, args.warmup_ms, args.rep_ms)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    start = time.perf_counter()
    copy_bw = copy_bandwidth(device, measure)
    log.info("%s: device-to-device copy %.0f GB/s", gpu, copy_bw / 1e9)
    report = dict(gpu=gpu, dtype=args.dtype, batch=args.batch, heads=args.heads,
                  copy_bytes_per_s=copy_bw, torch=torch.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  reference_checks=reference_check(device, small=args.dry_run),
                  checks=[], results=[], errors=[], complete=False, targets={})
    shapes = ordered_shapes(args)
    # Every Triton configuration is checked against the torch backend before any timing; one
    # that fails is reported and never timed.
    failed: set[tuple] = set()
    for causal, d, n in shapes:
        if n > args.check_max_tokens:
            continue
        for c in args.block_sizes:
            impls = implementations(causal, c)
            inputs = make_inputs(args, n, d, c, device, dtype, causal)
            # The reference: the torch backend in float64 on the same (rounded) inputs, so
            # the error is the kernels' own.
            errs = check_correctness(impls["triton"], lambda *t, f=impls["torch"]: f(
                *(x.double() for x in t)), inputs)
            bad = {k: e for k, e in errs.items() if not e < CHECK_TOL.get(k, CHECK_TOL["o"])}
            report["checks"].append(dict(causal=causal, d=d, n=n, block_size=c,
                                         passed=not bad, **errs))
            log.info("check causal=%s d=%d N=%d C=%d: %s%s", causal, d, n, c,
                     " ".join(f"{k} {e:.1e}" for k, e in errs.items()),
                     f"  FAILED {bad} (tolerances {CHECK_TOL}): not timed" if bad else "")
            if bad:
                failed.add((causal, d, n, c))
    rows = report["results"]
    for i, (causal, d, n) in enumerate(shapes):
        if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
            log.warning("time budget of %.0f s spent: %d of %d shapes timed",
                        args.time_budget_s, i, len(shapes))
            break
        impls = {(name, c): fn for c in args.block_sizes
                 for name, fn in implementations(causal, c).items()}
        impls.update({(name, None): fn for name, fn in baselines(device, causal).items()})
        for (name, c), fn in impls.items():
            if name == "sdpa_flash" and n > args.sdpa_max_tokens:
                continue
            if name == "torch" and n > args.torch_max_tokens:
                continue
            if name == "triton" and (causal, d, n, c) in failed:
                continue
            inputs = make_inputs(args, n, d, c or args.block_sizes[0], device, dtype, causal)
            for with_backward in (False, True):
                row = dict(impl=name, causal=causal, d=d, n=n, block_size=c,
                           mode="fwd+bwd" if with_backward else "fwd")
                try:
                    ms = bench_one(fn, inputs, measure, with_backward)
                except Exception as exc:  # noqa: BLE001 (one failure must not end the sweep)
                    log.warning("%s failed at %s: %s", name, row, exc)
                    report["errors"].append(dict(row, error=f"{type(exc).__name__}: {exc}"))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                nbytes = min_bytes(args, n, d, dtype.itemsize, with_backward)
                row.update(ms=ms, bytes=nbytes, bytes_per_s=nbytes / (ms * 1e-3))
                row["frac_copy_bw"] = row["bytes_per_s"] / copy_bw
                rows.append(row)
        report["targets"] = targets(rows)
        save(report)
    else:
        report["complete"] = True
    report["targets"] = targets(rows)
    return report


def print_table(report: dict) -> None:
    header = f"{'impl':<18}{'causal':>7}{'d':>5}{'N':>8}{'C':>6}{'mode':>9}{'ms':>10}" \
             f"{'GB/s':>9}{'%copy':>7}"
    print(f"{report['gpu']}  copy {report['copy_bytes_per_s'] / 1e9:.0f} GB/s  {report['dtype']}")
    print(header)
    for r in report["results"]:
        print(f"{r['impl']:<18}{r['causal']!s:>7}{r['d']:>5}{r['n']:>8}"
              f"{r['block_size'] or '-'!s:>6}{r['mode']:>9}{r['ms']:>10.3f}"
              f"{r['bytes_per_s'] / 1e9:>9.0f}{100 * r['frac_copy_bw']:>6.1f}%")
    if not report["complete"]:
        print("(cut short by --time-budget-s)")
    for e in report["errors"]:
        print(f"ERROR {e['impl']} causal={e['causal']} d={e['d']} N={e['n']} "
              f"C={e['block_size']} {e['mode']}: {e['error'][:200]}")
    for c in report["checks"]:
        if not c["passed"]:
            print(f"FAILED CHECK (not timed): causal={c['causal']} d={c['d']} N={c['n']} "
                  f"C={c['block_size']}: " + " ".join(
                      f"{k} {c[k]:.1e}" for k in ("o", "dq", "dk", "dv", "dmixing")))
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']:.3g} (goal {t['goal']})")


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    panels = sorted({(r["causal"], r["d"], r["mode"]) for r in report["results"]})
    if not panels:
        log.warning("nothing was timed: no plot")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (causal, d, mode) in zip(axes[0], panels, strict=True):
        rows = [r for r in report["results"]
                if (r["causal"], r["d"], r["mode"]) == (causal, d, mode)]
        for key in sorted({(r["impl"], r["block_size"] or 0) for r in rows}):
            pts = sorted((r["n"], r["ms"]) for r in rows
                         if (r["impl"], r["block_size"] or 0) == key)
            label = key[0] + (f" C={key[1]}" if key[1] else "")
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="ms",
               title=f"{'causal' if causal else 'non-causal'} d={d} {mode}")
        ax.legend(fontsize=6)
    fig.suptitle(f"MHLA kernels on {report['gpu']} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    if args.dry_run:
        # Triton reads this when the kernels are decorated: before mhla_kernels.triton_mhla
        # is first imported (in `implementations`).
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run")
    out = args.out
    if out is None:
        gpu = (torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run
               else "cpu-interpreter").replace(" ", "_").replace("/", "_")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = DEFAULT_OUT_DIR / f"kernels_{gpu}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    report = run(args, save)
    save(report)
    print_table(report)
    plot(report, out.with_suffix(".png"))
    log.info("wrote %s and %s", out, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
