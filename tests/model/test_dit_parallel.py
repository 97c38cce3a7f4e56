"""The tiny DiT and the tiny Wan-architecture model at TP = 2, CP = 2 and TP2 x CP2 (TP
with and without sequence parallelism) equal the single-process model with the
same full weights: the loss (global sum / global count), the gathered velocity and every
parameter gradient (TP shards gathered, summed over CP ranks as the DP x CP reduction
does). One spawn per world size holds all of its cases."""

import torch
import torch.distributed as dist

from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

B = 2
# Hybrid (an MHLA and a softmax block) with a caption; the second adds a learned position
# embedding, per-head Mc, activation checkpointing, caption tokens (cross-attention,
# padding masked) and x-prediction (`prediction="sample"`); the third is arch wan (q/k
# norms across the TP-split heads, 3-D RoPE) with caption tokens and a softmax block.
CONFIGS = {
    "hybrid-caption": dict(softmax_layers=[1], caption_dim=8),
    "learned-perhead-ckpt-text": dict(
        softmax_layers=[0], pos_embed="learned", per_head_mixing=True,
        activation_checkpointing=True, mixing_init="exp", text_dim=8, prediction="sample"),
    "wan-text-hybrid-perhead": dict(arch="wan", pos_embed="rope", text_dim=8, num_classes=0,
                                    softmax_layers=[1], per_head_mixing=True),
}


def _groups(rank, tp, cp):
    """(tp_group, cp_group, solo) for a world of tp x cp ranks, TP varying fastest. Every
    rank creates every group, in the same order, as torch.distributed requires."""
    world = tp * cp
    tp_groups = [dist.new_group([c * tp + i for i in range(tp)]) for c in range(cp)]
    cp_groups = [dist.new_group([c * tp + i for c in range(cp)]) for i in range(tp)]
    solos = [dist.new_group([r]) for r in range(world)]
    return tp_groups[rank // tp], cp_groups[rank % tp], solos[rank]


def _case(cfg_overrides, tp_group, cp_group, solo, sp=False):
    from mhla_dist.config.dit import dit_config
    from mhla_dist.model.rectified_flow import rectified_flow_loss
    from mhla_dist.model.video import build_dit
    from mhla_dist.parallel.tp_state import full_grads, full_state_dict, load_full_state_dict
    from tests.model.dit_helpers import batch, perturb, text_batch

    cfg = dit_config("tiny", **cfg_overrides)
    torch.manual_seed(11)
    ref = build_dit(cfg, tp_group=solo, cp_group=solo).double()
    perturb(ref)
    torch.manual_seed(11)
    model = build_dit(cfg, tp_group=tp_group, cp_group=cp_group, sequence_parallel=sp).double()
    load_full_state_dict(model, full_state_dict(ref, solo), tp_group)
    clip, noise, t, labels = batch(cfg, B, seed=3, dtype=torch.float64)
    caption = (torch.randn(B, cfg.caption_dim, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64) if cfg.caption_dim else None)
    cond = (labels, caption, *text_batch(cfg, B, dtype=torch.float64))

    ref_sum, ref_count = rectified_flow_loss(ref, clip, noise, t, *cond)
    (ref_sum / ref_count).backward()
    local_sum, local_count = rectified_flow_loss(model, clip, noise, t, *cond)
    count = torch.tensor(float(local_count), dtype=torch.float64)
    dist.all_reduce(count, group=cp_group)  # tokens are split over CP only
    (local_sum / count).backward()
    loss = local_sum.detach().clone()
    dist.all_reduce(loss, group=cp_group)

    errs = {"count": abs(count.item() - ref_count),
            "loss": rel_err(loss / count, ref_sum.detach() / ref_count)}
    with torch.no_grad():
        errs["velocity"] = rel_err(model.velocity(clip, t, *cond), ref.velocity(clip, t, *cond))
    ref_grads = full_grads(ref, solo)
    grads = full_grads(model, tp_group)
    # A gradient that is analytically zero (a softmax layer's key bias: it shifts every
    # score of a query alike) holds only rounding noise, which scales with the whole
    # gradient (x-prediction's 1/t makes it ~50x larger): compare it to that scale.
    floor = 1e-7 * torch.stack([g.norm() for g in ref_grads.values()]).norm().item()
    for name, g in grads.items():
        dist.all_reduce(g, group=cp_group)
        errs[f"d{name}"] = rel_err(g, ref_grads[name], floor=floor)
    errs["nonzero-grads"] = float(sum(g.norm() == 0 for g in ref_grads.values()))
    return errs


def dit_rank_fn(rank, world, layouts):
    from mhla_dist.parallel.topology import init_distributed

    init_distributed("gloo")
    torch.set_default_dtype(torch.float32)
    errs = {}
    for tp, cp, sp in layouts:
        tp_group, cp_group, solo = _groups(rank, tp, cp)
        for tag, overrides in CONFIGS.items():
            for key, value in _case(overrides, tp_group, cp_group, solo, sp).items():
                errs[f"tp{tp}xcp{cp}{'-sp' * sp}/{tag}/{key}"] = value
    if world == 4:
        errs.update(_default_groups_case())
    return errs


def _default_groups_case():
    """Built without groups, the DiT takes megatron-core's (`build_topology`)."""
    from mhla_dist.config.dit import dit_config
    from mhla_dist.model.dit import DiT
    from mhla_dist.parallel import build_topology
    from tests.model.dit_helpers import batch, perturb

    topo = build_topology(tp=2, cp=2)
    cfg = dit_config("tiny", softmax_layers=[1])
    outs = []
    for groups in ({}, dict(tp_group=topo.tp_group, cp_group=topo.cp_group)):
        torch.manual_seed(5)
        model = DiT(cfg, **groups)
        perturb(model)
        clip, _, t, labels = batch(cfg, B, seed=6)
        outs.append(model(clip, t, labels))
        assert (model.tp, model.cp, model.cp_rank) == (2, 2, topo.cp_rank)
    return {"megatron-groups/out": rel_err(outs[0], outs[1])}


def _check(ranks, expect_cases):
    for rank, errs in enumerate(ranks):
        assert len([k for k in errs if k.endswith("/loss")]) == expect_cases
        zero = {k: v for k, v in errs.items() if k.endswith("nonzero-grads") and v}
        assert not zero, f"rank {rank}: reference gradients that are exactly zero: {zero}"
        bad = {k: f"{v:.2e}" for k, v in errs.items()
               if not k.endswith("nonzero-grads") and not v < 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def test_dit_tp2_and_cp2_equal_single_process():
    """TP = 2 with and without sequence parallelism, and CP = 2."""
    _check(run_ranks(dit_rank_fn, 2, [(2, 1, False), (2, 1, True), (1, 2, False)]),
           3 * len(CONFIGS))


def test_dit_tp2xcp2_equals_single_process():
    _check(run_ranks(dit_rank_fn, 4, [(2, 2, False), (2, 2, True)]), 2 * len(CONFIGS))
