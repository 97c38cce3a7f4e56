"""Run by test_launchers under torchrun (or alone): builds the topology from the
launcher's environment, runs cp_mhla on its shard and writes what it saw as JSON."""

import json
import sys
from pathlib import Path

import torch


def main(out_dir: str) -> None:
    from mhla_dist.parallel import build_topology, cp_mhla, destroy_topology
    from mhla_kernels import mhla

    topo = build_topology(cp=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(1, 64, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 64, 2, 4, generator=g, dtype=torch.float64)
    mixing = torch.rand(8, 8, generator=g, dtype=torch.float64)
    local = 64 // topo.cp
    sl = slice(topo.cp_rank * local, (topo.cp_rank + 1) * local)
    out = cp_mhla(q[:, sl], k[:, sl], v[:, sl], mixing, 8, causal=True)
    err = ((out - mhla(q, k, v, mixing, 8, causal=True)[:, sl]).norm() / out.norm()).item()
    Path(out_dir, f"rank{topo.rank}.json").write_text(json.dumps({
        "world": topo.world_size, "cp": topo.cp, "dp": topo.dp, "cp_rank": topo.cp_rank,
        "backend": topo.backend, "err": err}))
    destroy_topology()


if __name__ == "__main__":
    main(sys.argv[1])
