"""Context-parallel MHLA: bytes moved per layer and time per layer, CP = 1, 2, 4.

    python tools/bench_cp.py                         # CPU, gloo, CP = 1,2,4
    python tools/bench_cp.py --device cuda --cp 1,2,4,8 --dtype bfloat16

Measured: `cp_mhla` forward and forward+backward time per layer on spawned ranks (gloo on
CPU, NCCL on GPUs), and the bytes its summary all-gather moved (counted by
`mhla_dist.parallel.comm_stats`). Analytic, beside it, per layer per rank for the same
N, H, d: what ring attention (K and V chunks passed around the ring) and all-to-all
(Ulysses: q, k, v in and o out) would receive. MHLA's traffic depends on the number of
blocks, not on N; the second table sweeps N at a fixed block count to show it.

On this 2-core CPU, CP = 4 runs four processes on two cores: its times show the
oversubscription, not the algorithm; bytes are exact either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

log = logging.getLogger("bench_cp")
ROOT = Path(__file__).resolve().parents[1]


def analytic_bytes(n: int, heads: int, d: int, dv: int, blocks: int, cp: int,
                   elem: int, batch: int = 1) -> dict[str, float]:
    """Bytes each rank receives per layer, forward (backward moves the same again)."""
    if cp == 1:
        return {"mhla_gathered": 0.0, "mhla_received": 0.0, "ring": 0.0, "ulysses": 0.0}
    frac = (cp - 1) / cp
    summaries = batch * blocks * heads * d * (dv + 1) * 4  # fp32 summaries, all blocks
    return {
        "mhla_gathered": float(summaries),
        "mhla_received": frac * summaries,
        "ring": frac * batch * n * heads * (d + dv) * elem,
        "ulysses": frac * batch * (n / cp) * heads * (3 * d + dv) * elem,
    }


def _rank_main(rank, world, port, spec, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from mhla_dist.parallel import build_topology, counting_bytes, cp_mhla, destroy_topology

    topo = build_topology(cp=world, backend="nccl" if spec["device"] == "cuda" else "gloo")
    device, dtype = topo.device, getattr(torch, spec["dtype"])
    n, h, d, c = spec["n"], spec["heads"], spec["dim"], spec["block_size"]
    local = n // world
    g = torch.Generator().manual_seed(rank)
    q, k = (torch.rand(1, local, h, d, generator=g).to(device, dtype).requires_grad_()
            for _ in range(2))
    v = torch.randn(1, local, h, d, generator=g).to(device, dtype).requires_grad_()
    mixing = torch.rand(n // c, n // c, device=device, requires_grad=True)
    do = torch.randn_like(v)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            cp_mhla(q, k, v, mixing, c, causal=spec["causal"], group=topo.cp_group)

    def fwd_bwd():
        cp_mhla(q, k, v, mixing, c, causal=spec["causal"], group=topo.cp_group).backward(do)

    def timed(fn):
        fn()
        times = []
        for _ in range(spec["repeats"]):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with counting_bytes() as stats:
        fwd()
        counted = stats.snapshot()
    result = {"fwd_ms": 1e3 * timed(fwd), "fwdbwd_ms": 1e3 * timed(fwd_bwd),
              "counted": counted}
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    destroy_topology()


def measure(spec: dict, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, port, spec, out_dir), nprocs=world, join=True)
        return json.loads(Path(out_dir, "result.json").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--n", type=int, default=16384, help="tokens of the whole sequence")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-n", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    blocks = args.n // args.block_size
    spec = dict(device=args.device, dtype=dtype, n=args.n, heads=args.heads, dim=args.dim,
                block_size=args.block_size, causal=not args.non_causal, repeats=args.repeats)

    rows = []
    for cp in args.cp:
        log.info("CP=%d ...", cp)
        measured = measure(spec, cp)
        rows.append({"cp": cp, **measured,
                     **analytic_bytes(args.n, args.heads, args.dim, args.dim, blocks, cp, elem)})
    mib = 2**20
    print(f"N={args.n} H={args.heads} d={args.dim} C={args.block_size} M={blocks} {dtype} "
          f"{'causal' if spec['causal'] else 'non-causal'}; bytes per layer per rank, forward")
    head = (f"{'CP':>3}{'fwd ms':>10}{'f+b ms':>10}{'MHLA gathered':>15}{'(counted)':>11}"
            f"{'MHLA recv':>11}{'ring recv':>11}{'Ulysses':>11}  (MiB)")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        counted = r["counted"].get("all_gather", {}).get("bytes", 0)
        print(f"{r['cp']:>3}{r['fwd_ms']:>10.1f}{r['fwdbwd_ms']:>10.1f}"
              f"{r['mhla_gathered'] / mib:>15.2f}{counted / mib:>11.2f}"
              f"{r['mhla_received'] / mib:>11.2f}{r['ring'] / mib:>11.2f}"
              f"{r['ulysses'] / mib:>11.2f}")
    sweep_cp = max(args.cp)
    sweep = [{"n": n, **analytic_bytes(n, args.heads, args.dim, args.dim, blocks, sweep_cp,
                                       elem)} for n in args.sweep_n]
    print(f"\nanalytic, CP={sweep_cp}, M={blocks} blocks at every N (MiB received per rank)")
    print(f"{'N':>9}{'MHLA':>10}{'ring':>10}{'Ulysses':>10}")
    for r in sweep:
        print(f"{r['n']:>9}{r['mhla_received'] / mib:>10.2f}{r['ring'] / mib:>10.2f}"
              f"{r['ulysses'] / mib:>10.2f}")
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_cp_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = (torch.cuda.get_device_name(0) if args.device == "cuda"
                   else f"CPU ({os.cpu_count()} cores), gloo")
    out.write_text(json.dumps({"device": device_name, "config": {**spec, "blocks": blocks},
                               "measured": rows, "analytic_sweep": sweep}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
