"""The CP all-gather moves exactly the summaries DESIGN §2 predicts:
`B * M * H * d * (dv + 1)` elements per layer per rank, whatever the tokens per block."""

import torch

from tests.parallel.harness import run_ranks

B, H, D, DV, M = 2, 3, 4, 5, 8


def bytes_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology, counting_bytes, cp_mhla

    topo = build_topology(cp=world)
    seen = {}
    for block_size in (4, 16):  # 4x the tokens, same number of blocks
        local = M * block_size // world
        g = torch.Generator().manual_seed(rank)
        q, k = (torch.rand(B, local, H, D, generator=g).requires_grad_() for _ in range(2))
        v = torch.randn(B, local, H, DV, generator=g).requires_grad_()
        mixing = torch.rand(M, M, requires_grad=True)
        with counting_bytes() as stats:
            o = cp_mhla(q, k, v, mixing, block_size, causal=True, group=topo.cp_group)
            forward = stats.snapshot()
            o.sum().backward()
            seen[block_size] = (forward, stats.snapshot())
    return seen


def test_cp_all_gather_moves_the_predicted_bytes():
    expect = B * M * H * D * (DV + 1) * 4  # float32 summaries
    for world in (2, 4):
        for seen in run_ranks(bytes_rank_fn, world):
            for block_size, (forward, total) in seen.items():
                assert forward == {"all_gather": {"bytes": expect, "calls": 1}}, block_size
                assert total["reduce_scatter"] == {"bytes": expect, "calls": 1}, block_size
