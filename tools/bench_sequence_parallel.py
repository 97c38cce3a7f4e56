"""Peak memory of one LM training step at TP = 2 with and without sequence parallelism.

    python tools/bench_sequence_parallel.py                 # N = 8192, hidden 256, 4 layers
    python tools/bench_sequence_parallel.py --n 16384 --layers 8

Each (activation checkpointing, SP) point spawns its own 2 gloo ranks (a fresh process
each, CPU malloc settings as in `bench_train.py`), builds the LM at TP = 2 with its
gradients allocated, and measures each rank's high-water mark above that over one
forward+backward (`tools/peak_memory.py`). It also counts, per rank, the bytes of the
residual stream entering the blocks (forward pre-hooks: the activations between blocks,
all that activation checkpointing keeps of a layer) and of every tensor autograd saves
for the backward (saved-tensor hooks, weights excluded; a checkpointed layer saves its
inside only while it recomputes). Writes JSON and the text (default
benchmarks/results/bench_sp_cpu.*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def _rank(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import torch

    from mhla_dist.config import LMConfig
    from mhla_dist.model.lm import MHLALanguageModel
    from mhla_dist.parallel import build_topology
    from tools.peak_memory import PeakMemory

    torch.set_num_threads(1)
    topo = build_topology(tp=world)
    cfg = LMConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                   num_layers=spec["layers"], num_heads=spec["heads"], max_seq_len=spec["n"],
                   num_blocks=spec["blocks"], activation_checkpointing=spec["ckpt"])
    torch.manual_seed(0)
    model = MHLALanguageModel(cfg, tp_group=topo.tp_group, sequence_parallel=spec["sp"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, spec["vocab"], (1, spec["n"] + 1), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, between = {}, {}

    def pack(t):  # what autograd keeps for the backward: storages other than weights
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def layer_input(module, args):  # the residual stream entering each block
        between[id(module)] = args[0].numel() * args[0].element_size()

    hooks = [layer.register_forward_pre_hook(layer_input) for layer in model.layers]
    with PeakMemory("cpu") as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, count = model.loss(seq[:, :-1], seq[:, 1:])
        (total / count).backward()
    for h in hooks:
        h.remove()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"peak_above_state_bytes": mem.peak_bytes, "saved_bytes": sum(saved.values()),
         "between_blocks_bytes": sum(between.values()),
         "loss": float(total.detach() / count)}))


def measure(spec: dict) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from mhla_dist.parallel.topology import free_port

    os.environ.update(MALLOC_ENV)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, free_port(), spec, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return {**spec, "ranks": ranks,
            **{k: max(r[k] for r in ranks)
               for k in ("peak_above_state_bytes", "saved_bytes", "between_blocks_bytes")}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    base = dict(n=args.n, hidden=args.hidden, layers=args.layers, heads=args.heads,
                blocks=args.blocks, vocab=args.vocab)
    rows = [measure({**base, "ckpt": ckpt, "sp": sp})
            for ckpt in (True, False) for sp in (False, True)]
    lines = [f"LM forward+backward at TP = 2, N={args.n}, hidden {args.hidden}, "
             f"{args.layers} layers, fp32, CPU; per rank (max of 2), MiB",
             f"{'checkpointing':>13} {'SP':>5} {'between blocks':>15} {'saved for bwd':>14} "
             f"{'peak':>8}"]
    for r in rows:
        lines.append(f"{str(r['ckpt']):>13} {str(r['sp']):>5} "
                     f"{r['between_blocks_bytes'] / 2**20:15.1f} "
                     f"{r['saved_bytes'] / 2**20:14.1f} "
                     f"{r['peak_above_state_bytes'] / 2**20:8.1f}")
    summary = {}
    for ckpt in (True, False):
        off, on = (next(r for r in rows if r["ckpt"] == ckpt and r["sp"] == sp)
                   for sp in (False, True))
        summary[f"ckpt={ckpt}"] = {k: on[k] / off[k] for k in
                                   ("between_blocks_bytes", "saved_bytes",
                                    "peak_above_state_bytes")}
        ratios = summary[f"ckpt={ckpt}"]
        lines.append(f"checkpointing={ckpt}, SP / no SP: between blocks "
                     f"{ratios['between_blocks_bytes']:.3f}, saved for backward "
                     f"{ratios['saved_bytes']:.3f}, peak {ratios['peak_above_state_bytes']:.3f}")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sp_cpu.txt").write_text(text + "\n")
    (args.out / "bench_sp_cpu.json").write_text(json.dumps(
        {"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
