"""Peak memory of the LM's loss, forward + backward: the fused chunked head +
cross-entropy (`model.loss`) against the plain cross-entropy of the full logits.

    python tools/bench_lm_loss.py                     # N = 8192, V = 32768, hidden 64, 1 layer
    python tools/bench_lm_loss.py --n 32768 --vocab 131072 --device cuda --dtype bf16

Each variant runs in a fresh child process (CPU: MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000, so freed memory is reused, not returned and faulted
in again). The model is built and its gradients allocated first; the peak is the
high-water mark above that (`tools/peak_memory.py`) over `--reps` forward+backward passes:
"above the model", the issue's measure. The parent also checks, at the same shape, that
the two losses and every gradient agree (fp32), and prints the fp32 logits' own size for
scale. Writes JSON, the text and a PNG (default benchmarks/results/bench_lm_loss_<dev>.*).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
TARGET_GIB = 0.3  # the issue: at most 0.3 GiB above the model at N = 8K, V = 32K
VARIANTS = ("plain", "fused")


def build(spec: dict, group):
    import torch

    from mhla_dist.config import LMConfig
    from mhla_dist.model.lm import MHLALanguageModel

    cfg = LMConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_layers=spec["layers"],
                   num_heads=spec["heads"], max_seq_len=spec["n"], num_blocks=spec["blocks"])
    torch.manual_seed(0)
    model = MHLALanguageModel(cfg, tp_group=group, cp_group=group)
    model = model.to(spec["device"], getattr(torch, spec["dtype"]))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, spec["vocab"], (1, spec["n"] + 1), generator=g).to(spec["device"])
    return model, seq[:, :-1], seq[:, 1:]


def loss_of(model, tokens, targets, variant: str):
    from mhla_dist.model.lm import token_loss

    if variant == "plain":
        return token_loss(model(tokens), targets)
    return model.loss(tokens, targets)


def child(spec: dict) -> dict:

    from mhla_dist.convert.model_spec import single_rank_groups

    with single_rank_groups() as group:
        return _measure(spec, build(spec, group))


def _measure(spec: dict, built) -> dict:
    import torch

    from tools.peak_memory import PeakMemory

    model, tokens, targets = built
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    times = []
    with PeakMemory(spec["device"]) as mem:
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            total, count = loss_of(model, tokens, targets, spec["variant"])
            (total / count).backward()
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"variant": spec["variant"], "peak_above_model_bytes": mem.peak_bytes,
            "model_bytes": params, "seconds": min(times)}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, **(MALLOC_ENV if spec["device"] == "cpu" else {}))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{spec['variant']} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(spec: dict) -> dict:
    """Largest relative differences of the loss and of every gradient, fused vs plain."""

    from mhla_dist.convert.model_spec import single_rank_groups

    with single_rank_groups() as group:
        return _agreement(build({**spec, "dtype": "float32"}, group))


def _agreement(built) -> dict:
    model, tokens, targets = built
    results = []
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        total, count = loss_of(model, tokens, targets, variant)
        (total / count).backward()
        results.append((total.detach() / count, {n: p.grad.clone()
                                                 for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    rel = {n: float((ga[n] - gb[n]).norm() / gb[n].norm().clamp(min=1e-30)) for n in ga}
    return {"loss_rel": float((a - b).abs() / b.abs()), "max_grad_rel": max(rel.values()),
            "worst_grad": max(rel, key=rel.get)}


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    gib = [r["peak_above_model_bytes"] / 2**30 for r in rows]
    ax.bar([r["variant"] for r in rows], gib, color=["tab:gray", "tab:blue"])
    ax.axhline(TARGET_GIB, color="tab:red", linestyle="--", label=f"target {TARGET_GIB} GiB")
    ax.set_ylabel("peak above the model (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {k: getattr(args, k) for k in ("n", "vocab", "hidden", "layers", "heads", "blocks",
                                          "reps", "device", "dtype")}
    rows = [run_child({**spec, "variant": v}) for v in VARIANTS]
    agree = agreement(spec)
    logits_gib = args.n * args.vocab * 4 / 2**30
    lines = [f"LM loss forward+backward, N={args.n}, V={args.vocab}, hidden {args.hidden}, "
             f"{args.layers} layer(s), {args.dtype} on {args.device}",
             f"fp32 logits alone: {logits_gib:.3f} GiB",
             f"{'variant':8} {'peak above model (GiB)':>24} {'time (s)':>10}"]
    for r in rows:
        lines.append(f"{r['variant']:8} {r['peak_above_model_bytes'] / 2**30:24.3f} "
                     f"{r['seconds']:10.3f}")
    fused = rows[1]["peak_above_model_bytes"] / 2**30
    ratio = rows[1]["peak_above_model_bytes"] / max(rows[0]["peak_above_model_bytes"], 1)
    lines.append(f"fused / plain peak: {ratio:.3f}")
    lines.append(f"agreement (fp32): loss {agree['loss_rel']:.2e}, worst gradient "
                 f"{agree['max_grad_rel']:.2e} ({agree['worst_grad']})")
    lines.append(f"{'PASS' if fused <= TARGET_GIB else 'FAIL'}: fused peak {fused:.3f} GiB "
                 f"<= {TARGET_GIB} GiB above the model")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_lm_loss_{args.device.split(':')[0]}"
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"spec": spec, "rows": rows, "agreement": agree, "fp32_logits_gib": logits_gib,
         "fused_over_plain_peak": ratio, "target_gib": TARGET_GIB,
         "pass": fused <= TARGET_GIB}, indent=1))
    plot(rows, stem.with_suffix(".png"), lines[0])


if __name__ == "__main__":
    main()
