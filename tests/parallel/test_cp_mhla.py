"""`cp_mhla` on 2 and 4 gloo ranks equals the single-process `mhla` (and the reference):
the gathered outputs, and the gradients of q, k, v and mixing."""

import itertools

import pytest
import torch

from mhla_kernels import mhla, mhla_reference
from tests.kernels.inputs import make_inputs
from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

CASES = list(itertools.product([False, True], [True, False], [False, True]))
CASE_IDS = [f"{'causal' if c else 'noncausal'}-{'norm' if n else 'unnorm'}-"
            f"{'perhead' if p else 'shared'}" for c, n, p in CASES]
N, C = 96, 8  # 12 blocks: 6 per rank at CP=2, 3 at CP=4


def case_inputs(per_head, seed):
    # A mixing matrix larger than needed: every rank must use the same leading corner.
    q, k, v, mixing = make_inputs(2, N, 2, 4, 3, C, per_head=per_head, extra_blocks=2,
                                  seed=seed)
    do = torch.randn(2, N, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return q, k, v, mixing, do


def run_cases(topo, world, cases, inputs, tokens, block_size, **kw):
    """`{case: {o, dq, dk, dv, dmixing}}` of `cp_mhla` on this rank's slice, for every
    `(causal, normalize, per_head)` of `cases` and its `inputs(per_head, seed=case)`."""
    from mhla_dist.parallel import cp_mhla

    local = tokens // world
    sl = slice(topo.cp_rank * local, (topo.cp_rank + 1) * local)
    results = {}
    for i, (causal, normalize, per_head) in enumerate(cases):
        q, k, v, mixing, do = inputs(per_head, seed=i)
        leaves = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
        mixing.requires_grad_()
        o = cp_mhla(*leaves, mixing, block_size, causal=causal, normalize=normalize, **kw)
        o.backward(do[:, sl])
        results[i] = {"o": o.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad,
                      "dv": leaves[2].grad, "dmixing": mixing.grad}
    return results


def cp_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology

    return run_cases(build_topology(cp=world), world, CASES, case_inputs, N, C)


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request):
    return request.param, run_ranks(cp_rank_fn, request.param)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_cp_mhla_equals_single_process(cp_results, case):
    world, ranks = cp_results
    causal, normalize, per_head = CASES[case]
    q, k, v, mixing, do = case_inputs(per_head, seed=case)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    ref = mhla(*inputs, C, causal=causal, normalize=normalize)
    ref.backward(do)
    truth = mhla_reference(q, k, v, mixing, C, causal=causal, normalize=normalize)

    got = {key: torch.cat([r[case][key] for r in ranks], dim=1) for key in ("o", "dq", "dk", "dv")}
    assert rel_err(got["o"], ref) < 1e-12 and rel_err(got["o"], truth) < 1e-10
    for key, leaf in zip(("dq", "dk", "dv"), inputs[:3], strict=True):
        assert rel_err(got[key], leaf.grad) < 1e-12, key
    # Mc is replicated: each rank holds its rows' gradient; their sum is the whole one.
    dmixing = sum(r[case]["dmixing"] for r in ranks)
    assert rel_err(dmixing, inputs[3].grad, floor=1e-3) < 1e-12
