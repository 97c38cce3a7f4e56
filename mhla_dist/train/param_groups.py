"""The optimizer's parameter groups: weight decay only where it belongs.

AdamW's decoupled decay pulls every parameter towards zero. Norm gains and biases
(1-D parameters) are excluded, as in Megatron-LM and torchtitan, and so is any parameter
whose name holds one of `optim.no_decay` (by default `mixing`, the Mc matrices: their
scale is what mixes the blocks). The groups keep a fixed order (decayed first) so that a
checkpoint's groups line up with a resumed run's.
"""

from __future__ import annotations

from torch import nn


def param_groups(module: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """`[{"params", "weight_decay", "names"}]` for DeepSpeed (or any torch optimizer);
    empty groups are left out."""
    decay, other = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or any(key in name for key in no_decay)
        (other if exempt else decay).append((name, p))
    groups = [(decay, weight_decay), (other, 0.0)]
    return [{"params": [p for _, p in members], "weight_decay": wd,
             "names": [n for n, _ in members]}
            for members, wd in groups if members]


def apply_hyperparameters(optimizer, groups: list[dict], betas, eps: float) -> None:
    """Set each group's weight decay, betas and eps from the config again: a loaded
    checkpoint brings its own groups' values (the learning rate is set every step)."""
    if len(optimizer.param_groups) != len(groups):
        raise RuntimeError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, "
                           f"the config makes {len(groups)}")
    for group, want in zip(optimizer.param_groups, groups, strict=True):
        group.update(weight_decay=want["weight_decay"], betas=tuple(betas), eps=eps)
