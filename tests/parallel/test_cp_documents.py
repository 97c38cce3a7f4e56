"""`cp_mhla` with packed documents (global `cu_seqlens`) on 2 and 4 gloo ranks equals the
single-process packed `mhla` and the per-document reference: documents cross rank
boundaries and a rank boundary cuts blocks. The gather moves the slot summaries the
layout predicts, whatever N."""

import itertools

import pytest
import torch

from mhla_kernels import document_layout, mhla, mhla_reference
from tests.kernels.inputs import make_inputs
from tests.kernels.test_documents import per_document
from tests.numerics import rel_err
from tests.parallel.harness import run_ranks
from tests.parallel.test_cp_mhla import run_cases

CASES = list(itertools.product([True, False], [True, False], [False, True]))
IDS = [f"{'causal' if c else 'noncausal'}-{'norm' if n else 'unnorm'}-"
       f"{'perhead' if p else 'shared'}" for c, n, p in CASES]
B, N, C = 2, 48, 5  # 12 tokens per rank at CP = 4: blocks of 5 never align with ranks
# Row 0: a document over all ranks, one of length 1, short ones; row 1: one cut at 24
# and 36 (the CP=2 and CP=4 boundaries) inside blocks, and a run of single tokens.
OFFSETS = torch.tensor([0, 1, 2, 9, 30, 31, 48, 50, 66, 67, 68, 69, 96])


def case_inputs(per_head, seed):
    q, k, v, mixing = make_inputs(B, N, 2, 4, 3, C, per_head=per_head, seed=seed)
    do = torch.randn(B, N, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    return q, k, v, mixing, do


def cp_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology

    topo = build_topology(cp=world)
    results = run_cases(topo, world, CASES, case_inputs, N, C, cu_seqlens=OFFSETS)
    results["bytes"] = [bytes_of_rank(rank, world, topo.cp_group, block_size, row)
                        for block_size, row in ((8, 96), (16, 192))]
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request):
    return request.param, run_ranks(cp_rank_fn, request.param)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_cp_documents_equal_single_process(cp_results, case):
    _, ranks = cp_results
    causal, normalize, per_head = CASES[case]
    q, k, v, mixing, do = case_inputs(per_head, seed=case)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    ref = mhla(*inputs, C, causal=causal, normalize=normalize, cu_seqlens=OFFSETS)
    ref.backward(do)
    truth = per_document(q, k, v, mixing, C, OFFSETS, causal=causal, normalize=normalize)
    got = {key: torch.cat([r[case][key] for r in ranks], dim=1) for key in ("o", "dq", "dk", "dv")}
    assert rel_err(got["o"], ref) < 1e-12 and rel_err(got["o"], truth) < 1e-10
    for key, leaf in zip(("dq", "dk", "dv"), inputs[:3], strict=True):
        assert rel_err(got[key], leaf.grad) < 1e-12, key
    dmixing = sum(r[case]["dmixing"] for r in ranks)
    assert rel_err(dmixing, inputs[3].grad, floor=1e-3) < 1e-12


H, D, DV = 3, 4, 5


def bytes_of_rank(rank, world, group, block_size, row):
    from mhla_dist.parallel import counting_bytes, cp_mhla

    local = row // world
    cu = torch.arange(0, 2 * row + 1, 30)  # 30-token documents
    cu = torch.unique(torch.cat([cu, torch.tensor([row, 2 * row])]))
    g = torch.Generator().manual_seed(rank)
    q, k = (torch.rand(2, local, H, D, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, local, H, DV, generator=g).requires_grad_()
    mixing = torch.rand(64, 64, requires_grad=True)
    slots = document_layout(cu, 2, local, block_size, cp_size=world, cp_rank=rank).num_slots
    # (document, row) pieces on each rank: documents intersecting its shard of each row.
    starts, stops = cu[:-1], cu[1:]
    pieces = [sum(int(((starts < b * row + (r + 1) * local) & (stops > b * row + r * local)).sum())
                  for b in range(2)) for r in range(world)]
    with counting_bytes() as stats:
        o = cp_mhla(q, k, v, mixing, block_size, causal=True, group=group,
                    cu_seqlens=cu)
        forward = stats.snapshot()
        o.sum().backward()
    return slots, pieces, forward, stats.snapshot()


def test_cp_documents_gather_moves_the_slot_summaries(cp_results):
    """Per rank `S * H * d * (dv + 1)` elements, S = the most segments of any rank, which
    is at most B * (N/P) / C + (documents on the rank, per row) + B: the bound holds for
    twice the tokens at twice the block size."""
    world, ranks = cp_results
    for r in ranks:
        for (block_size, row), (slots, pieces, forward, total) in zip(
                ((8, 96), (16, 192)), r["bytes"], strict=True):
            local = row // world
            assert slots <= 2 * local // block_size + max(pieces) + 2
            expect = world * slots * H * D * (DV + 1) * 4
            assert forward == {"all_gather": {"bytes": expect, "calls": 1}}
            assert total["reduce_scatter"] == {"bytes": expect, "calls": 1}


def test_reference_loop_agrees_with_the_cp_case_offsets():
    """The per-document loop here and `mhla_reference(cu_seqlens=)` agree."""
    q, k, v, mixing, _ = case_inputs(True, seed=0)
    a = mhla_reference(q, k, v, mixing, C, causal=True, cu_seqlens=OFFSETS)
    assert rel_err(a, per_document(q, k, v, mixing, C, OFFSETS, causal=True)) < 1e-14
