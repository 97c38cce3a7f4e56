"""Benchmark one sampler step of the MHLA DiT against the same model with SDPA attention.

    python tools/bench_dit.py                        # CPU, 4K..64K tokens, SDPA up to 32K
    python tools/bench_dit.py --tokens 4096,8192 --repeats 1
    python tools/bench_dit.py --device cuda --preset wan1.3b --frames-per-block 1
    python tools/bench_dit.py --device cuda --preset wan2.1-1.3b   # Wan2.1's own blocks
    python tools/bench_dit.py hidden_size=192 num_heads=3    # any other DiTConfig field

A step is what `euler_sample` does once per step: one guided velocity evaluation
(`DiT.velocity` on the clips and their unconditional copies, batch 2 x `--batch`; batch 1
with `--cfg off`), the guidance combination and the Euler update, under no_grad, in the
model's dtype. It calls `euler_sample(..., steps=1)`, so changes to the sampler or the
model show up here unchanged. Default model: 16 latent channels of 32 x 32, patch 1x2x2
(256 tokens per frame), hidden 128, 2 heads of 64, depth 2, 10 classes; `--preset` or
`--config` (a YAML with a `model:` section) and KEY=VALUE overrides pick another. At each
token count the clip has as many frames as give that many tokens (rounded to whole
blocks); the spatial size, patch and spatial block grid are the config's, and each MHLA
block spans `--frames-per-block` patch frames (default the config's temporal tile: one
frame, 256 tokens, for the default model), so M = N / C grows with N and Mc is [M, M].
The SDPA variant is the same config with `softmax_layers = range(depth)` and the same
weights (the MHLA model's, less Mc). adaLN-Zero starts a DiT as the identity, so the
zero-initialised weights get small random values first: the attention then reaches the
velocity, as in a trained model. On CPU SDPA stops at `--sdpa-max-tokens`, where its
O(N^2) time runs away; a skipped cell is reported as such.

At each token count one child process times both variants interleaved (warm-up, then
`--repeats` rounds alternating which goes first; medians, and their ratio taken in that
one process, which the target uses). Peak memory comes from a fresh child per variant
running one step: the resident-set high-water mark (CPU) or
`torch.cuda.max_memory_allocated` (GPU) above the memory once the model and its inputs
exist (`tools/peak_memory.py`). On CPU the children run with MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000: otherwise glibc returns every large buffer to the OS
after use and each step page-faults its memory in again, timing the allocator. At
`--breakdown-tokens` (default the largest) the MHLA child also runs hooked steps timing
the q/k/v/o projections, the rest of the attention (feature map + MHLA operator), the MLPs
and everything else (embeddings, adaLN, norms, final layer, patchify, guidance).

Targets: on CPU the MHLA step at 32K takes at most a quarter of the SDPA one (SDPA/MHLA
>= 4); on GPU the paper's 2.1x end to end. Prints a table and the verdict; writes JSON,
the printed text and a PNG (default benchmarks/results/bench_dit_<cpu|cuda>.*).
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

log = logging.getLogger("bench_dit")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import bench_child  # noqa: E402  (the repo root first, as a script)
from tools.bench_op import device_name  # noqa: E402

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
VARIANTS = ("mhla", "sdpa")
DEFAULT_MODEL = dict(in_channels=16, frames=1, height=32, width=32, patch=[1, 2, 2],
                     block_grid=[1, 1, 1], hidden_size=128, depth=2, num_heads=2,
                     mlp_ratio=4.0, num_classes=10, caption_dim=0)
# SDPA step / MHLA step at 32K tokens, at least: the CPU target, the paper's GPU one.
TARGET_TOKENS, SPEEDUP_TARGET = 32768, {"cpu": 4.0, "cuda": 2.1}


# ------------------------------------------------------------------ models and the step
def grid_config(base: dict, tokens: int, attention: str, frames_per_block: int | None = None):
    """The `DiTConfig` of one point: `base`'s spatial size, patch and spatial blocks, with
    the frames that give ~`tokens` tokens in whole blocks of `frames_per_block` patch
    frames (default `base`'s temporal tile); every block softmax for `"sdpa"`."""
    from mhla_dist.config.dit import DiTConfig

    cfg = DiTConfig(**base).validate()
    per_frame, tile = cfg.patch_grid[1] * cfg.patch_grid[2], frames_per_block or cfg.tile[0]
    blocks = max(1, round(tokens / (per_frame * tile)))
    fields = dict(base, frames=blocks * tile * cfg.patch[0],
                  block_grid=[blocks, *cfg.block_grid[1:]])
    if attention == "sdpa":
        fields["softmax_layers"] = list(range(cfg.depth))
    return DiTConfig(**fields).validate()


def fill_zero_init(model, seed: int) -> None:
    """Small random values for every all-zero parameter (adaLN-Zero's modulation and the
    final layer): a fresh DiT is the identity and its attention would not reach the
    output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def build_models(spec: dict, variants, group) -> dict:
    """`{variant: DiT}` at `spec["tokens"]`, in eval mode on `spec`'s device and dtype; the
    SDPA model holds the MHLA model's weights (all of them but Mc) when both are built."""
    import torch

    from mhla_dist.model.video import build_dit

    models = {}
    for v in variants:
        torch.manual_seed(spec["seed"])
        cfg = grid_config(spec["base"], spec["tokens"], v, spec["frames_per_block"])
        models[v] = model = build_dit(cfg, tp_group=group, cp_group=group)
        if "mhla" in models and v != "mhla":
            own = model.state_dict()
            model.load_state_dict({k: t for k, t in models["mhla"].state_dict().items()
                                   if k in own})
        else:
            fill_zero_init(model, spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    return {v: m.to(device=spec["device"], dtype=dtype).eval() for v, m in models.items()}


def sampler_inputs(cfg, batch: int, seed: int, device) -> dict:
    """Noise `[batch, C, F, H, W]`, labels, a pooled caption or `text_len` caption tokens,
    where the model takes them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, cfg.in_channels, cfg.frames, cfg.height, cfg.width, generator=g)
    labels = (torch.randint(0, cfg.num_classes, (batch,), generator=g)
              if cfg.num_classes else None)
    caption = torch.randn(batch, cfg.caption_dim, generator=g) if cfg.caption_dim else None
    text = (torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g) if cfg.text_dim
            else None)
    return {k: None if x is None else x.to(device) for k, x in
            (("noise", noise), ("labels", labels), ("caption", caption), ("text", text))}


def sampler_step(model, inputs: dict, cfg_scale: float):
    """One step of `euler_sample`: a guided velocity evaluation and the Euler update."""
    from mhla_dist.model.rectified_flow import euler_sample

    return euler_sample(model, inputs["noise"], inputs["labels"], 1, cfg_scale=cfg_scale,
                        caption=inputs["caption"], text=inputs.get("text"))


def attention_breakdown(model, step, steps: int, sync) -> dict:
    """Median ms over `steps` hooked steps: q/k/v/o projections, the rest of the attention
    (feature map + operator), the MLPs, and everything else."""
    groups = {"qkvo projections": [], "attention core": [], "mlp": []}
    for block in model.blocks:
        projections = [m for n, m in block.attn.named_children() if n.endswith("_proj")]
        groups["qkvo projections"] += projections
        groups["attention core"].append(block.attn)
        groups["mlp"].append(block.mlp)
    totals, opened, handles = {}, {}, []
    for name, modules in groups.items():
        for m in modules:
            def pre(mod, _args):
                sync()
                opened[id(mod)] = time.perf_counter()

            def post(mod, _args, _out, name=name):
                sync()
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - opened.pop(id(mod))
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    rows = []
    try:
        for _ in range(steps):
            totals.clear()
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            total = time.perf_counter() - t0
            core = totals["attention core"] - totals["qkvo projections"]
            row = {"qkvo projections": totals["qkvo projections"], "attention core": core,
                   "mlp": totals["mlp"]}
            row["rest"] = total - sum(row.values())
            rows.append({k: 1e3 * t for k, t in row.items()} | {"total": 1e3 * total})
    finally:
        for h in handles:
            h.remove()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    total = med.pop("total")
    return {"parts": {k: {"ms": ms, "fraction": ms / sum(med.values())}
                      for k, ms in med.items()}, "total_ms": total, "steps": steps}


# ---------------------------------------------------------------- child: one measurement
def measure(spec: dict) -> dict:
    """`spec["mode"]` "memory": the peak of one step of `spec["attention"]` in this fresh
    process; "time": every variant of `spec["variants"]`, interleaved round by round."""
    import torch

    from mhla_dist.convert.model_spec import single_rank_groups
    from tools.peak_memory import PeakMemory

    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
    cfg_scale = spec["cfg_scale"] if spec["cfg"] else 1.0
    variants = [spec["attention"]] if spec["mode"] == "memory" else spec["variants"]
    with single_rank_groups() as group:
        try:
            models = build_models(spec, variants, group)
            cfg = next(iter(models.values())).cfg
            inputs = sampler_inputs(cfg, spec["batch"], spec["seed"], spec["device"])
            steps = {v: (lambda m=m: sampler_step(m, inputs, cfg_scale))
                     for v, m in models.items()}
            common = {"num_tokens": cfg.num_tokens, "frames": cfg.frames,
                      "block_size": cfg.block_size, "num_blocks": cfg.num_blocks,
                      "threads": torch.get_num_threads()}
            if spec["mode"] == "memory":
                with PeakMemory(spec["device"]) as mem:
                    out = steps[variants[0]]()
                if not torch.isfinite(out).all():
                    return {"status": "error: non-finite sample"}
                return {"status": "ok", "peak_bytes": mem.peak_bytes,
                        "base_bytes": mem.base_bytes, **common,
                        "parameters": sum(p.numel() for p in models[variants[0]].parameters())}
            times = {v: [] for v in variants}
            for r in range(-spec["warmup"], spec["repeats"]):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = steps[v]()
                    sync()
                    if r >= 0:
                        times[v].append((time.perf_counter() - t0, time.process_time() - c0))
                    if not torch.isfinite(out).all():
                        return {"status": f"error: non-finite {v} sample"}
            result = {"status": "ok", **common, "variants": {v: {
                "step_ms": 1e3 * statistics.median(t for t, _ in ts),
                "step_ms_each": [1e3 * t for t, _ in ts],
                # CPU time of all this process's threads: on a shared CPU it moves less than
                # the wall time does, a hint of how much other processes slowed a step
                "step_cpu_ms": 1e3 * statistics.median(c for _, c in ts)}
                for v, ts in times.items()}}
            if spec.get("with_breakdown"):
                result["breakdown"] = attention_breakdown(models["mhla"], steps["mhla"],
                                                          spec["repeats"], sync)
            return result
        except (torch.cuda.OutOfMemoryError, MemoryError):
            return {"status": "oom"}


# ------------------------------------------------------------------------ parent: sweep
def run_child(spec: dict, timeout: float) -> dict:
    return bench_child.run_child("tools.bench_dit", spec, timeout)


def sweep(args) -> list[dict]:
    """One row per (variant, tokens): memory from its own child, time from the pair's."""
    base = dict(device=args.device, dtype=args.dtype, base=args.base, batch=args.batch,
                cfg=args.cfg == "on", cfg_scale=args.cfg_scale,
                frames_per_block=args.frames_per_block, warmup=args.warmup,
                repeats=args.repeats, seed=args.seed)
    rows = []
    for tokens in args.tokens:
        skip = args.sdpa_max_tokens and tokens > args.sdpa_max_tokens
        variants = ["mhla"] if skip else list(VARIANTS)
        t0 = time.perf_counter()
        memory = {v: run_child(dict(base, tokens=tokens, mode="memory", attention=v),
                               args.timeout) for v in variants}
        timing = run_child(dict(base, tokens=tokens, mode="time", variants=variants,
                                with_breakdown=tokens == args.breakdown_tokens), args.timeout)
        for v in VARIANTS:
            row = {"attention": v, "tokens": tokens}
            if v not in variants:
                rows.append(dict(row, status=f"skipped (tokens > --sdpa-max-tokens "
                                             f"{args.sdpa_max_tokens})"))
                continue
            mem, ok = memory[v], timing.get("status") == "ok"
            row.update({k: x for k, x in timing.items() if k not in ("variants", "breakdown")})
            row.update(timing["variants"][v] if ok else {})
            if ok and v == "mhla" and "breakdown" in timing:
                row["breakdown"] = timing["breakdown"]
            if mem.get("status") == "ok":
                for key in ("num_tokens", "frames", "block_size", "num_blocks"):
                    row.setdefault(key, mem[key])  # where the timing child failed
                row.update(peak_bytes=mem["peak_bytes"], base_bytes=mem["base_bytes"],
                           parameters=mem["parameters"],
                           peak_bytes_per_token=mem["peak_bytes"] / mem["num_tokens"])
            elif ok:
                row["status"] = f"memory: {mem.get('status')}"
            rows.append(row)
        log.info("tokens=%-6d %s (%.0f s)", tokens,
                 ", ".join(f"{r['attention']} {r['status']}" for r in rows[-2:]),
                 time.perf_counter() - t0)
    return rows


def find(rows, attention: str, tokens: int) -> dict | None:
    return next((r for r in rows if (r["attention"], r["tokens"]) == (attention, tokens)
                 and "step_ms" in r), None)


def speedup(rows, tokens: int) -> float | None:
    m, s = find(rows, "mhla", tokens), find(rows, "sdpa", tokens)
    return s["step_ms"] / m["step_ms"] if m and s else None


def targets(rows, device: str) -> dict:
    """SDPA step / MHLA step at 32K (both medians from one process) against the device's
    target; `value` None where the sweep did not time both."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    value, limit = speedup(rows, TARGET_TOKENS), SPEEDUP_TARGET[kind]
    what = ("SDPA step / MHLA step at 32K tokens, one process"
            + (" (the issue's CPU target: MHLA <= 1/4 of SDPA)" if kind == "cpu"
               else " (the paper's 2.1x end to end)"))
    return {"sdpa_over_mhla_step_32k": {"what": what, "value": value, "min": limit,
                                        "met": None if value is None else value >= limit}}


def table(rows) -> str:
    head = (f"{'tokens':>7}{'frames':>7}{'M':>5}{'C':>6}{'MHLA ms':>11}{'SDPA ms':>11}"
            f"{'SDPA/MHLA':>11}{'MHLA MiB':>10}{'SDPA MiB':>10}  status")
    lines = [head, "-" * len(head)]
    for tokens in dict.fromkeys(r["tokens"] for r in rows):
        m, s = (next(r for r in rows if (r["attention"], r["tokens"]) == (v, tokens))
                for v in VARIANTS)
        ms = [f"{r['step_ms']:.1f}" if "step_ms" in r else "skipped"
              if r["status"].startswith("skipped") else "-" for r in (m, s)]
        mib = [f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else "-" for r in (m, s)]
        ratio = speedup(rows, tokens)
        ratio = f"{ratio:.2f}x" if ratio else "-"
        shape = (f"{m['frames']:>7}{m['num_blocks']:>5}{m['block_size']:>6}" if "frames" in m
                 else f"{'-':>7}{'-':>5}{'-':>6}")
        note = "; ".join(f"{v} {r['status']}" for v, r in zip(VARIANTS, (m, s), strict=True)
                         if r["status"] != "ok") or "ok"
        lines.append(f"{m.get('num_tokens', tokens):>7}{shape}{ms[0]:>11}{ms[1]:>11}"
                     f"{ratio:>11}{mib[0]:>10}{mib[1]:>10}  {note}")
    return "\n".join(lines)


def breakdown_table(row: dict) -> str:
    b = row["breakdown"]
    lines = [f"where the MHLA step goes at {row['num_tokens']} tokens (median of {b['steps']} "
             f"hooked steps, {b['total_ms']:.1f} ms; untimed step {row['step_ms']:.1f} ms)",
             f"{'part':<18}{'ms':>9}{'share':>8}"]
    lines += [f"{name:<18}{p['ms']:>9.1f}{100 * p['fraction']:>7.1f}%"
              for name, p in b["parts"].items()]
    return "\n".join(lines)


def target_lines(found: dict) -> str:
    lines = []
    for key, t in found.items():
        if t["value"] is None:
            lines.append(f"SKIP {key}: not measured ({t['what']}, target >= {t['min']})")
        else:
            lines.append(f"{'PASS' if t['met'] else 'FAIL'} {key}: {t['value']:.2f}x "
                         f"(target >= {t['min']}x; {t['what']})")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for v in VARIANTS:
        ok = [r for r in rows if r["attention"] == v]
        for ax, key, scale in ((axes[0], "step_ms", 1), (axes[1], "peak_bytes", 2**-20)):
            pts = sorted((r["num_tokens"], r[key] * scale) for r in ok if key in r)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=v.upper())
    for ax, ylabel in zip(axes, ("sampler step (ms)", "peak memory (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("video tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (a DiTConfig field)")
    return key, yaml.safe_load(value)


def base_model(args) -> dict:
    """The config fields every point starts from: a preset, a YAML's model section or the
    default model, then the KEY=VALUE overrides."""
    from dataclasses import asdict

    from mhla_dist.config.dit import DIT_PRESETS, DiTConfig, dit_config

    if args.config:
        from mhla_dist.config import load_config

        model = load_config(args.config).model
        if not isinstance(model, DiTConfig):
            raise ValueError(f"--config {args.config} holds a {model.kind} model, not a DiT")
        fields = asdict(model)
    else:
        fields = dict(DIT_PRESETS[args.preset] if args.preset else DEFAULT_MODEL)
    return asdict(dit_config(**{**fields, **args.overrides}))


def parse_args(argv=None):
    from mhla_dist.config.dit import DIT_PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", type=_override, metavar="KEY=VALUE",
                   help="other DiTConfig fields of both models (hidden_size=192, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(DIT_PRESETS), help="default: see above")
    src.add_argument("--config", type=Path, help="a YAML config with a DiT model section")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 8192, 16384, 32768, 65536], help="video tokens per clip")
    p.add_argument("--frames-per-block", type=int, default=None,
                   help="patch frames per MHLA block (default the config's temporal tile)")
    p.add_argument("--batch", type=int, default=1, help="clips (x2 under guidance)")
    p.add_argument("--cfg", choices=("on", "off"), default="on",
                   help="classifier-free guidance: conditional + unconditional batch")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdpa-max-tokens", type=int, default=None,
                   help="skip SDPA above this many tokens (default 32768 on CPU, none on "
                        "CUDA; 0: none)")
    p.add_argument("--breakdown-tokens", type=int, default=None,
                   help="tokens of the MHLA step breakdown (default the largest; 0: none)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (.txt and .png beside it); a folder takes the default name")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.overrides = dict(args.overrides)
    cuda = args.device.startswith("cuda")
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if args.sdpa_max_tokens is None:
        args.sdpa_max_tokens = 0 if cuda else 32768
    if args.breakdown_tokens is None:
        args.breakdown_tokens = max(args.tokens)
    elif args.breakdown_tokens and args.breakdown_tokens not in args.tokens:
        p.error(f"--breakdown-tokens {args.breakdown_tokens} is not one of --tokens "
                f"{args.tokens}")
    try:
        args.base = base_model(args)
        for v in VARIANTS:
            for n in args.tokens:
                cfg = grid_config(args.base, n, v, args.frames_per_block)
        if args.cfg == "on" and not (cfg.num_classes or cfg.caption_dim or cfg.text_dim):
            raise ValueError("--cfg on needs a model with num_classes, caption_dim or text_dim "
                             "> 0 to guide with (or pass --cfg off)")
    except (ValueError, TypeError) as exc:  # TypeError: a KEY=VALUE that is no field
        p.error(str(exc))
    name = f"bench_dit_{'cuda' if cuda else 'cpu'}.json"
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / name
    elif args.out.is_dir() or not args.out.suffix:
        args.out = args.out / name
    if cuda:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dataclasses import asdict

    t0, load = time.perf_counter(), [os.getloadavg()[0]]
    rows = sweep(args)
    load.append(os.getloadavg()[0])
    name, found = device_name(args.device), targets(rows, args.device)
    models = {v: asdict(grid_config(args.base, max(args.tokens), v, args.frames_per_block))
              for v in VARIANTS}
    b, detail = args.base, next((r for r in rows if "breakdown" in r), None)
    guidance = f"guidance on (batch 2 x {args.batch})" if args.cfg == "on" else \
        f"guidance off (batch {args.batch})"
    header = [f"one DiT sampler step (euler_sample, {guidance}), {args.dtype}, {name}",
              f"depth {b['depth']}, hidden {b['hidden_size']}, {b['num_heads']} heads x "
              f"{b['hidden_size'] // b['num_heads']}, {b['in_channels']} x {b['height']} x "
              f"{b['width']} latents, patch {b['patch']}; MHLA blocks M x C, Mc [M, M], "
              f"{b['feature_map']}; SDPA: every block softmax"]
    if args.device == "cpu" and max(load) > (os.cpu_count() or 1):
        header.append(f"note: load average {max(load):.1f} on {os.cpu_count()} cores during "
                      "the sweep: other processes shared the CPU, the times are noisy")
    text = "\n".join(header + [table(rows), ""]
                     + ([breakdown_table(detail), ""] if detail else []) + [target_lines(found)])
    print(text)
    report = {
        "device": name, "device_kind": args.device, "python": platform.python_version(),
        "torch": __import__("torch").__version__, "command": [Path(sys.argv[0]).name,
                                                              *sys.argv[1:]],
        "env": bench_child.MALLOC_ENV if args.device == "cpu" else {}, "load_average": load,
        "wall_s": time.perf_counter() - t0,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "child"},
        "models": models, "targets": found,
        "breakdown": {"tokens": detail["tokens"], **detail["breakdown"]} if detail else None,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".txt").write_text(text + "\n")
    png = args.out.with_suffix(".png")
    plot(rows, png, f"DiT sampler step, MHLA vs SDPA, depth {b['depth']} hidden "
                    f"{b['hidden_size']}, {guidance}, {args.dtype}, {name}")
    print(f"wrote {args.out}, {args.out.with_suffix('.txt').name} and {png.name}")


if __name__ == "__main__":
    main()
