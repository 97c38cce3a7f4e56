"""Our collectives call torch's current single-buffer names: no FutureWarning (torch
2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor and repeated the warning
in every quickstart log), forward or backward."""

import warnings

import torch

from tests.parallel.harness import run_ranks


def _rank_fn(rank, world):
    import torch.distributed as dist

    from mhla_dist.parallel.collectives import (
        gather_from_group,
        reduce_scatter_to_group,
        start_gather,
    )

    dist.init_process_group("gloo")
    group = dist.group.WORLD
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = gather_from_group(x, 0, group)
        scattered = reduce_scatter_to_group(gathered * 2, 0, group)
        pending = start_gather(x, 1, group).wait()
        (scattered.sum() + pending.sum()).backward()
    return {"gathered": gathered.detach(), "scattered": scattered.detach(), "grad": x.grad}


def test_collectives_raise_no_deprecation_warning():
    r0, r1 = run_ranks(_rank_fn, 2)
    expect = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    assert torch.equal(r0["gathered"], expect) and torch.equal(r1["gathered"], expect)
    assert torch.equal(r0["scattered"], torch.full((2, 3), 4.0))  # 2 ranks x 2 x 1
    assert torch.equal(r1["scattered"], torch.full((2, 3), 8.0))
    # d/dx of sum(reduce_scatter(2 * gather(x))) + sum(gather(x)) = 2 * 2 + 2 per rank
    assert torch.equal(r0["grad"], torch.full((2, 3), 6.0))
