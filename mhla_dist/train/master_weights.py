"""The fp32 master weights of a DeepSpeed engine, read and written at any ZeRO stage.

Under bf16 the module's parameters are bf16 copies; the weights the optimizer updates are
the fp32 masters in ZeRO's partitions (stages 1-3) or in DeepSpeed's bf16 optimizer
(stage 0). What a run saves as its weights and what a run started from saved weights
updates must be those masters, not the rounded copies. DeepSpeed's
`safe_get_full_fp32_param` / `safe_set_full_fp32_param` reach them at ZeRO 1-3 and in its
`BF16_Optimizer` (a collective over the data-parallel group: every rank calls them in the
same order). At ZeRO-0 DeepSpeed 0.19 wraps a torch optimizer in `FP16_UnfusedOptimizer`
for bf16, whose masters are its `fp32_groups`, position by position with `fp16_groups`;
a plain fp32 engine without a ZeRO optimizer has no separate masters.
"""

from __future__ import annotations

import torch

from mhla_dist.parallel.tp_state import gather_tp_tensors, tp_slice


def _grouped_masters(optimizer) -> dict[int, torch.Tensor]:
    """`{id(model parameter): its fp32 master}` of an optimizer that keeps whole fp32
    copies beside its low-precision groups (DeepSpeed's fp16/bf16 unfused optimizer)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if low is None or high is None:
        return {}
    return {id(p): m for lg, hg in zip(low, high, strict=True)
            for p, m in zip(lg, hg, strict=True)}


def _master(param, grouped: dict[int, torch.Tensor]) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    return master if master is not None else grouped.get(id(param))


def master_state_dict(engine, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (ZeRO partitions and TP shards gathered), on
    every rank."""
    module = engine.module
    grouped = _grouped_masters(engine.optimizer)
    local = {}
    for name, p in module.named_parameters():
        master = _master(p, grouped)
        local[name] = (master if master is not None else p.detach()).float().cpu()
    return gather_tp_tensors(module, local, tp_group)


@torch.no_grad()
def set_master_weights(engine, state: dict[str, torch.Tensor], tp_group) -> None:
    """Make this rank's fp32 masters this TP rank's slices of the full fp32 `state`.

    The module's (possibly bf16) parameters are expected to hold the rounded values
    already (the weights were loaded before DeepSpeed wrapped the model); without this,
    DeepSpeed would have made the masters from those rounded values."""
    from deepspeed.utils import safe_set_full_fp32_param

    grouped = _grouped_masters(engine.optimizer)
    for name, p in engine.module.named_parameters():
        value = tp_slice(p, state[name], tp_group).to(device=p.device, dtype=torch.float32)
        if id(p) in grouped:
            grouped[id(p)].copy_(value)
        else:
            safe_set_full_fp32_param(p, value)
