"""Benchmark the MHLA operator against SDPA and plain linear attention.

    python tools/bench_op.py                    # CPU, causal, N = 1K..64K, both sweeps
    python tools/bench_op.py --quick            # N = 1K..4K, a few seconds
    python tools/bench_op.py --non-causal       # the DiT's path against the plain einsum form
    python tools/bench_op.py --device cuda --dtype bfloat16 --non-causal
    python tools/bench_op.py --packed           # packed documents against unpacked

Two sweeps show where the cost comes from: `fixed-block` keeps the block size (M grows
with N, so the M^2 mix grows), `fixed-count` keeps the number of blocks (the operator is
then linear in N). Baselines: `sdpa` (torch's scaled_dot_product_attention; on CPU it stops
at --sdpa-max-n because its O(N^2) time, not its memory, runs away; on GPU it stops where
it runs out of memory) and `linear` (plain linear attention: MHLA with one block, the
identity of DESIGN §1).

`--non-causal` runs the non-causal sweep instead: fixed block counts (`--nc-blocks`, default
16 and 64), normalised and not, MHLA against `plain`, a blocked MHLA written here from the
formula (summaries by one einsum, the mix as one matmul over blocks, outputs by one
einsum, autograd for the backward), measured back to back, alternating which goes first;
the targets are the ratios mhla / plain (at most 1.0 everywhere).

`--packed` runs packed documents (`cu_seqlens`) against the same N unpacked
(`bench_op_packed.py`).

Each measurement runs in a fresh child process. On CPU the children run with
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000: otherwise glibc hands every
buffer over 32 MB back to the OS after use, each large-N step page-faults its memory in
again, and the timing measures the allocator, not the operator. Peak memory is the
resident-set high-water mark of the first forward+backward (CPU) or
`torch.cuda.max_memory_allocated` (GPU), over the memory before the inputs were made;
`peak/io` divides it by the bytes of q, k, v, o and their gradients.

Prints a table, writes JSON and a log-log PNG of time vs N (default under
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_op")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- child: one measurement
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_run(spec: dict, variant: str):
    """The inputs and a `run()` closure of one variant: `(run, inputs, do)`."""
    import torch
    import torch.nn.functional as F

    from mhla_kernels import mhla

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    b, n, h, d = spec["batch"], spec["n"], spec["heads"], spec["dim"]
    causal = spec["causal"]
    shape = (b, h, n, d) if variant == "sdpa" else (b, n, h, d)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.rand(shape, generator=g, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    do = torch.randn(shape, generator=g, device=device, dtype=dtype)
    normalize = spec.get("normalize", True)
    if variant == "sdpa":
        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run, (q, k, v), do
    c = spec["block_size"] if variant != "linear" else n
    m = spec["num_blocks"] if variant == "plain" else -(-n // c)
    mixing = torch.rand(m, m, generator=g, device=device, dtype=torch.float32)
    mixing.requires_grad_()
    if variant == "plain":
        def run():
            return plain_mhla(q, k, v, mixing, m, normalize=normalize)
    elif variant == "mhla-packed":
        from bench_op_packed import document_offsets

        cu = document_offsets(n, spec["doc_len"])

        def run():
            return mhla(q, k, v, mixing, c, causal=causal, normalize=normalize, cu_seqlens=cu)
    else:
        backend = variant.split("-", 1)[1] if variant.startswith("mhla") else "torch"

        def run():
            return mhla(q, k, v, mixing, c, causal=causal, normalize=normalize,
                        backend=backend)
    return run, (q, k, v, mixing), do


def _timer(spec: dict):
    import torch

    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn, repeats: int) -> float:
        # A sample runs `fn` often enough to last ~20 ms: a single millisecond-sized call
        # measures the clock and the scheduler as much as the operator.
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / inner)
        return sorted(times)[len(times) // 2]

    return timed


def _phases(run, inputs, do):
    import torch

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        run().backward(do)

    return fwd, fwd_bwd


def measure_pair(spec: dict) -> dict:
    """The time ratio of `spec["variants"]` [a, b], measured in one process, alternating a
    and b round by round (the ratio a side-by-side comparison quotes)."""
    timed = _timer(spec)
    phases = [_phases(*_make_run(spec, v)) for v in spec["variants"]]
    for fwd, fwd_bwd in phases:
        fwd_bwd()
        fwd()
    best = {(i, p): float("inf") for i in range(2) for p in range(2)}
    for _ in range(spec["repeats"]):
        for i, fns in enumerate(phases):
            for p, fn in enumerate(fns):
                best[i, p] = min(best[i, p], timed(fn, 1))
    return {"status": "ok", "fwd_ratio": best[0, 0] / best[1, 0],
            "fwdbwd_ratio": best[0, 1] / best[1, 1]}


def measure(spec: dict) -> dict:
    """One variant in this fresh process: the peak memory of its first forward+backward,
    then the median forward and forward+backward times."""
    import torch

    cuda = spec["device"].startswith("cuda")
    mem_before = torch.cuda.memory_allocated() if cuda else _rss("VmRSS")
    run, inputs, do = _make_run(spec, spec["variant"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark
    try:
        run().backward(do)
        if cuda:
            torch.cuda.synchronize()
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return {"status": "oom"}
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")) - mem_before
    timed = _timer(spec)
    fwd, fwd_bwd = _phases(run, inputs, do)
    fwd()
    b, n, h, d = spec["batch"], spec["n"], spec["heads"], spec["dim"]
    io = 2 * b * n * h * (2 * d + 2 * d) * do.element_size()
    return {"status": "ok", "fwd_ms": 1e3 * timed(fwd, spec["repeats"]),
            "fwdbwd_ms": 1e3 * timed(fwd_bwd, spec["repeats"]),
            "peak_bytes": peak, "io_bytes": io, "peak_over_io": peak / io}


def plain_mhla(q, k, v, mixing, num_blocks: int, *, normalize: bool, eps: float = 1e-6):
    """Non-causal MHLA as one would write it from the formula (the `plain` baseline):
    whole blocks, einsums, autograd."""
    import torch

    b, n, h, d = q.shape
    c = n // num_blocks
    qb, kb, vb = (x.reshape(b, num_blocks, c, h, x.shape[-1]) for x in (q, k, v))
    mc = mixing.to(q.dtype)
    t = torch.einsum("im,bmhde->bihde", mc, torch.einsum("bmchd,bmche->bmhde", kb, vb))
    o = torch.einsum("bmchd,bmhde->bmche", qb, t)
    if normalize:
        y = torch.einsum("im,bmhd->bihd", mc, kb.sum(2))
        o = o / (torch.einsum("bmchd,bmhd->bmch", qb, y).unsqueeze(-1) + eps)
    else:
        o = o * d**-0.5
    return o.reshape(b, n, h, v.shape[-1])


# ------------------------------------------------------------------------ parent: sweep
def run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, **(MALLOC_ENV if spec["device"] == "cpu" else {}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["?"]
        return {"status": "error", "error": tail[0]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def backends(device: str) -> list[str]:
    found = ["torch"]
    try:
        import torch

        from mhla_kernels.triton_mhla import triton_available

        if triton_available(torch.device(device)):
            found.append("triton")
    except ImportError:
        pass
    return found


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def sweep(args) -> list[dict]:
    base = dict(device=args.device, dtype=args.dtype, batch=args.batch, heads=args.heads,
                dim=args.dim, causal=not args.non_causal, repeats=args.repeats)
    rows = []
    plan = []
    for n in args.ns:
        for name, c in (("fixed-block", args.block_size), ("fixed-count", n // args.num_blocks)):
            for be in backends(args.device):
                plan.append(dict(base, sweep=name, variant=f"mhla-{be}", n=n,
                                 block_size=max(c, 1)))
        plan.append(dict(base, sweep="baseline", variant="linear", n=n, block_size=n))
        if args.device == "cpu" and n > args.sdpa_max_n:
            rows.append(dict(base, sweep="baseline", variant="sdpa", n=n, block_size=0,
                             status=f"skipped (N > --sdpa-max-n {args.sdpa_max_n})"))
        else:
            plan.append(dict(base, sweep="baseline", variant="sdpa", n=n, block_size=0))
    for spec in plan:
        result = run_child(spec, args.timeout)
        rows.append({**spec, "num_blocks": -(-spec["n"] // max(spec["block_size"], 1)),
                     **result})
        log.info("%-11s %-12s N=%-6d %s", spec["sweep"], spec["variant"], spec["n"],
                 result.get("status"))
    return rows


def noncausal_sweep(args) -> list[dict]:
    """MHLA and `plain` back to back for every N, block count and normalisation."""
    base = dict(device=args.device, dtype=args.dtype, batch=args.batch, heads=args.heads,
                dim=args.dim, causal=False, repeats=args.repeats)
    rows = []
    turn = 0
    for n in args.ns:
        for m in args.nc_blocks:
            for normalize in (False, True):
                pair = [f"mhla-{be}" for be in backends(args.device)] + ["plain"]
                turn += 1
                common = dict(base, sweep=f"M={m}" + ("" if normalize else " unnorm"), n=n,
                              block_size=max(n // m, 1), num_blocks=m, normalize=normalize)
                for variant in pair if turn % 2 else pair[::-1]:
                    spec = dict(common, variant=variant)
                    result = run_child(spec, args.timeout)
                    rows.append({**spec, **result})
                    log.info("%-12s %-12s N=%-6d %s", spec["sweep"], variant, n,
                             result.get("status"))
                # the ratio itself: both in one process, alternating
                pair_spec = dict(common, variant="mhla-torch vs plain",
                                 variants=["mhla-torch", "plain"])
                result = run_child(pair_spec, args.timeout)
                rows.append({**pair_spec, **result})
    return rows


def noncausal_targets(rows) -> dict:
    """mhla / plain, forward and forward+backward, the worst over every N and M."""
    ratios = {"fwd": [], "fwdbwd": [], "peak": []}
    for r in rows:
        if r["variant"] != "mhla-torch" or r.get("status") != "ok":
            continue
        same = [x for x in rows if x.get("status") == "ok"
                and (x["n"], x["sweep"]) == (r["n"], r["sweep"])]
        p = next((x for x in same if x["variant"] == "plain"), None)
        pair = next((x for x in same if "variants" in x), None)
        if p is None or pair is None:
            continue
        r["over_plain_fwd"], r["over_plain_fwdbwd"] = pair["fwd_ratio"], pair["fwdbwd_ratio"]
        r["peak_over_plain"] = r["peak_bytes"] / max(p["peak_bytes"], 1)
        for key in ("fwd", "fwdbwd"):
            ratios[key].append(r[f"over_plain_{key}"])
        ratios["peak"].append(r["peak_over_plain"])
    out = {f"noncausal_{k}_over_plain_max": {"value": max(v), "limit": 1.0}
           for k, v in ratios.items() if v}
    for t in out.values():
        t["met"] = t["value"] <= t["limit"]
    return out


def find(rows, sweep_name, variant, n):
    for r in rows:
        if (r["sweep"], r["variant"], r["n"], r.get("status")) == (sweep_name, variant, n, "ok"):
            return r
    return None


def targets(rows) -> dict:
    """The operator issue's targets, where the sweep measured them."""
    out = {}
    a, b = find(rows, "fixed-count", "mhla-torch", 8192), find(rows, "fixed-count",
                                                               "mhla-torch", 32768)
    if a and b:
        out["fwdbwd_32k_over_8k_fixed_count"] = {"value": b["fwdbwd_ms"] / a["fwdbwd_ms"],
                                                 "limit": 5.0}
    s = find(rows, "baseline", "sdpa", 8192)
    if a and s:
        out["mhla_over_sdpa_fwdbwd_8k"] = {"value": a["fwdbwd_ms"] / s["fwdbwd_ms"],
                                           "limit": 0.25}
    peaks = [r["peak_over_io"] for r in rows if r["n"] == 65536 and r.get("status") == "ok"
             and r["variant"].startswith("mhla")]
    if peaks:
        out["peak_over_io_64k"] = {"value": max(peaks), "limit": 3.0}
    for t in out.values():
        t["met"] = t["value"] <= t["limit"]
    return out


def table(rows) -> str:
    head = f"{'sweep':<12}{'variant':<13}{'N':>7}{'C':>7}{'M':>6}{'fwd ms':>10}" \
           f"{'fwd+bwd ms':>12}{'peak MiB':>10}{'peak/io':>9}  status"
    lines = [head, "-" * len(head)]
    order = {"fixed-block": 0, "fixed-count": 1, "baseline": 2}
    for r in sorted((r for r in rows if "variants" not in r),
                    key=lambda r: (r["n"], order.get(r["sweep"], 3), r["sweep"], r["variant"])):
        ok = r.get("status") == "ok"
        fwd, fb, peak, ratio = (
            (f"{r['fwd_ms']:.2f}", f"{r['fwdbwd_ms']:.2f}", f"{r['peak_bytes'] / 2**20:.0f}",
             f"{r['peak_over_io']:.2f}") if ok else ("-",) * 4
        )
        c, m = (r["block_size"], r.get("num_blocks", 0)) if r["variant"] != "sdpa" else ("-", "-")
        vs = (f"  x plain: fwd {r['over_plain_fwd']:.2f} fwd+bwd {r['over_plain_fwdbwd']:.2f}"
              f" peak {r['peak_over_plain']:.2f}" if "over_plain_fwd" in r else "")
        lines.append(
            f"{r['sweep']:<12}{r['variant']:<13}{r['n']:>7}{c:>7}{m:>6}{fwd:>10}{fb:>12}"
            f"{peak:>10}{ratio:>9}  {r.get('status')}{vs}"
        )
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [r for r in rows if "variants" not in r]  # ratio-only rows
    series = sorted({(r["sweep"], r["variant"]) for r in rows})
    for sweep_name, variant in series:
        pts = sorted((r["n"], r["fwdbwd_ms"]) for r in rows if r.get("status") == "ok"
                     and (r["sweep"], r["variant"]) == (sweep_name, variant))
        if pts:
            label = variant if sweep_name == "baseline" else f"{variant} ({sweep_name})"
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--quick", action="store_true", help="N = 1024,2048,4096, 1 repeat")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256, help="C of the fixed-block sweep")
    p.add_argument("--num-blocks", type=int, default=32, help="M of the fixed-count sweep")
    p.add_argument("--non-causal", action="store_true",
                   help="the non-causal sweep against the plain einsum form")
    p.add_argument("--nc-blocks", type=lambda s: [int(x) for x in s.split(",")],
                   default=[16, 64], help="block counts M of the non-causal sweep")
    p.add_argument("--packed", action="store_true",
                   help="packed documents (cu_seqlens) against unpacked, causal")
    p.add_argument("--doc-len", type=int, default=300, help="--packed: mean document length")
    p.add_argument("--packed-blocks", type=lambda s: [int(x) for x in s.split(",")],
                   default=[64, 256], help="--packed: block sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept")
    p.add_argument("--sdpa-max-n", type=int, default=16384, help="CPU only")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.ns, args.repeats = [1024, 2048, 4096], 1
    elif args.packed and "--ns" not in " ".join(argv or sys.argv):
        args.ns = [4096, 8192, 16384, 32768]
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.out is None:
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
        suffix = "_noncausal" if args.non_causal else "_packed" if args.packed else ""
        args.out = ROOT / "benchmarks" / "results" / f"bench_op_{kind}{suffix}.json"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_pair(spec) if "variants" in spec else measure(spec)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.packed:
        # tools/ is on sys.path when this file runs as a script (the children too)
        from bench_op_packed import packed_sweep, packed_table, packed_targets

        rows = packed_sweep(args, run_child)
        targets_of, table_of = packed_targets, packed_table
    else:
        rows = noncausal_sweep(args) if args.non_causal else sweep(args)
        targets_of = noncausal_targets if args.non_causal else targets
        table_of = table
    name = device_name(args.device)
    report = {
        "device": name, "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "env": MALLOC_ENV if args.device == "cpu" else {},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "child"},
        "targets": targets_of(rows),
        "results": rows,
    }
    print(table_of(rows))
    for key, t in report["targets"].items():
        print(f"{key}: {t['value']:.3f} (limit {t['limit']}) {'met' if t['met'] else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    png = args.out.with_suffix(".png")
    causal = "causal" if not args.non_causal else "non-causal"
    if args.packed:
        causal += f" packed (~{args.doc_len}-token documents) vs unpacked"
    plot(rows, png, f"MHLA {causal}, B={args.batch} H={args.heads} d={args.dim} "
                    f"{args.dtype}, {name}")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
