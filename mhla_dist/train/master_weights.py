"""The fp32 master weights of a DeepSpeed engine, read and written at any ZeRO stage.

Under bf16 the module's parameters are bf16 copies; the weights the optimizer updates are
the fp32 masters in ZeRO's partitions (stages 1-3) or in DeepSpeed's bf16 optimizer
(stage 0). What a run saves as its weights and what a run started from saved weights
updates must be those masters, not the rounded copies. DeepSpeed's
`safe_get_full_fp32_param` / `safe_set_full_fp32_param` reach them at every stage (a
collective over the data-parallel group: every rank calls them in the same order); a
plain fp32 engine without a ZeRO optimizer has no separate masters.
"""

from __future__ import annotations

import torch

from mhla_dist.parallel.tp_state import gather_tp_tensors, tp_slice


def master_state_dict(engine, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (ZeRO partitions and TP shards gathered), on
    every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    local = {}
    for name, p in module.named_parameters():
        master = safe_get_full_fp32_param(p)
        local[name] = (master if master is not None else p.detach()).float().cpu()
    return gather_tp_tensors(module, local, tp_group)


@torch.no_grad()
def set_master_weights(engine, state: dict[str, torch.Tensor], tp_group) -> None:
    """Make this rank's fp32 masters this TP rank's slices of the full fp32 `state`.

    The module's (possibly bf16) parameters are expected to hold the rounded values
    already (the weights were loaded before DeepSpeed wrapped the model); without this,
    DeepSpeed would have made the masters from those rounded values."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in engine.module.named_parameters():
        value = tp_slice(p, state[name], tp_group)
        safe_set_full_fp32_param(p, value.to(device=p.device, dtype=torch.float32))
