"""Tensor-parallel attention and MLP equal the TP = 1 layer with the same full weights:
outputs, input gradients and (gathered) weight gradients; also at TP = 2 x CP = 2."""

import pytest
import torch
import torch.distributed as dist

from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

B, N, HIDDEN, HEADS, HEAD_DIM, C = 2, 32, 16, 4, 4, 4
MAX_BLOCKS = N // C + 2


def _errors(tag, layer, ref, x_local, x_full, out, ref_out, sl, topo, mine):
    from mhla_dist.parallel.tp_state import full_grads

    errs = {f"{tag}/out": rel_err(out, ref_out[:, sl]),
            f"{tag}/dx": rel_err(x_local.grad, x_full.grad[:, sl])}
    grads = full_grads(layer, topo.tp_group)
    ref_grads = full_grads(ref, mine)
    for name, g in grads.items():
        # Each CP rank's weight gradient covers its tokens: the CP sum is the whole one
        # (what the DP x CP reduction of ZeRO does).
        dist.all_reduce(g, group=topo.cp_group)
        errs[f"{tag}/d{name}"] = rel_err(g, ref_grads[name], floor=1e-6)
    return errs


def tp_rank_fn(rank, world, tp, cp):
    from mhla_dist.parallel import build_topology
    from mhla_dist.parallel.tp_layers import ParallelMHLAttention, ParallelSwiGLU
    from mhla_dist.parallel.tp_state import full_state_dict, load_full_state_dict

    topo = build_topology(tp=tp, cp=cp)
    solo = [dist.new_group([r]) for r in range(world)][rank]  # a TP = CP = 1 "group"
    local = N // cp
    sl = slice(topo.cp_rank * local, (topo.cp_rank + 1) * local)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, HIDDEN, generator=g, dtype=torch.float64)
    dy = torch.randn(B, N, HIDDEN, generator=g, dtype=torch.float64)
    errs = {}

    def check(tag, build):
        torch.manual_seed(11)
        layer = build(topo.tp_group, topo.cp_group).double()
        ref = build(solo, solo).double()
        load_full_state_dict(ref, full_state_dict(layer, topo.tp_group), solo)
        x_local, x_full = x[:, sl].clone().requires_grad_(), x.clone().requires_grad_()
        out, ref_out = layer(x_local), ref(x_full)
        out.backward(dy[:, sl])
        ref_out.backward(dy)
        errs.update(_errors(tag, layer, ref, x_local, x_full, out, ref_out, sl, topo, solo))

    for causal in (False, True):
        for per_head in (False, True):
            mixing = torch.rand(*((HEADS,) if per_head else ()), MAX_BLOCKS, MAX_BLOCKS,
                                generator=torch.Generator().manual_seed(5))
            check(f"attn-{'causal' if causal else 'noncausal'}-"
                  f"{'perhead' if per_head else 'shared'}",
                  lambda tg, cg, causal=causal, per_head=per_head, mixing=mixing:
                  ParallelMHLAttention(HIDDEN, HEADS, HEAD_DIM, block_size=C,
                                       max_blocks=MAX_BLOCKS, causal=causal,
                                       per_head_mixing=per_head, mixing_init=mixing,
                                       tp_group=tg, cp_group=cg))
    check("mlp", lambda tg, cg: ParallelSwiGLU(HIDDEN, 24, tp_group=tg))
    return errs


@pytest.mark.parametrize("tp,cp", [(2, 1), (2, 2)], ids=["tp2", "tp2xcp2"])
def test_tp_layers_equal_single_process(tp, cp):
    ranks = run_ranks(tp_rank_fn, tp * cp, tp, cp)
    assert len(ranks[0]) >= 5 * 3
    for rank, errs in enumerate(ranks):
        bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < 1e-10}
        assert not bad, f"rank {rank}: {bad}"
