"""DeepSpeed ZeRO-2 over the mpu adapter at CP = 2: its data-parallel group is DP x CP,
CP replicas stay bit-identical, and with the loss scaled as DESIGN §2 says
(`sum(local token losses) * DP*CP / global tokens`) the parameters after a few AdamW
steps with gradient clipping equal a single-process run on the whole sequence."""

import torch
import torch.distributed as dist

from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

N, HIDDEN, STEPS, LR, CLIP = 32, 16, 3, 1e-2, 1.0


def _build(tp_group, cp_group):
    from mhla_dist.parallel.tp_layers import ParallelMHLAttention

    torch.manual_seed(0)
    return ParallelMHLAttention(HIDDEN, 4, 4, block_size=4, max_blocks=N // 4, causal=True,
                                tp_group=tp_group, cp_group=cp_group)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(1, N, HIDDEN, generator=g), torch.randn(1, N, HIDDEN, generator=g)


def zero2_rank_fn(rank, world):
    import deepspeed

    from mhla_dist.parallel import DeepSpeedMPU, build_topology, init_deepspeed_comm

    topo = build_topology(cp=world)
    init_deepspeed_comm("gloo")
    model = _build(topo.tp_group, topo.cp_group)
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0,
                                                        "torch_adam": True}},
              "gradient_clipping": CLIP, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config, mpu=DeepSpeedMPU(topo))
    local = N // topo.cp
    sl = slice(topo.cp_rank * local, (topo.cp_rank + 1) * local)
    for step in range(STEPS):
        x, target = _batch(step)
        token_losses = (engine(x[:, sl]) - target[:, sl]).pow(2).sum(-1)
        engine.backward(token_losses.sum() * topo.dp_cp_size / N)
        engine.step()
    group_ranks = dist.get_process_group_ranks(engine.mpu.get_data_parallel_group())
    return {"dp_world": engine.dp_world_size, "group": group_ranks,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def single_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology

    topo = build_topology()
    model = _build(topo.tp_group, topo.cp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        x, target = _batch(step)
        loss = (model(x) - target).pow(2).sum(-1).sum() / N
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zero2_cp2_matches_single_process_and_keeps_replicas_identical():
    ranks = run_ranks(zero2_rank_fn, 2)
    (single,) = run_ranks(single_rank_fn, 1)
    for r in ranks:
        assert r["dp_world"] == 2 and r["group"] == [0, 1]
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"CP replicas differ in {name}"
        err = rel_err(p, single[name])
        assert err < 1e-5, f"{name}: rel err {err:.2e}"
