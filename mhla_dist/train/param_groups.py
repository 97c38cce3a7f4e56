"""The optimizer's parameter groups: weight decay only where it belongs.

AdamW's decoupled decay pulls every parameter towards zero. Norm gains and biases
(1-D parameters) are excluded, as in Megatron-LM and torchtitan, and so is any parameter
whose name holds one of `optim.no_decay` (by default `mixing`, the Mc matrices: their
scale is what mixes the blocks). The groups keep a fixed order (decayed first) so that a
checkpoint's groups line up with a resumed run's.
"""

from __future__ import annotations

from torch import nn


def is_mixing(name: str) -> bool:
    """Whether a parameter is an MHLA layer's `Mc`."""
    return name == "mixing" or name.endswith(".mixing")


def param_groups(module: nn.Module, weight_decay: float, no_decay: list[str],
                 mixing_lr_scale: float = 1.0) -> list[dict]:
    """`[{"params", "weight_decay", "names", "lr_scale"}]` for DeepSpeed (or any torch
    optimizer); empty groups are left out. With `mixing_lr_scale != 1` the Mc matrices
    form a third group whose learning rate is scaled (`lr_scale`)."""
    decay, other, mixing = [], [], []
    own_group = mixing_lr_scale != 1.0
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or any(key in name for key in no_decay)
        if own_group and is_mixing(name):
            mixing.append((name, p, exempt))
        else:
            (other if exempt else decay).append((name, p))
    groups = [(decay, weight_decay, 1.0), (other, 0.0, 1.0)]
    if mixing:
        wd = 0.0 if all(exempt for *_, exempt in mixing) else weight_decay
        groups.append(([(n, p) for n, p, _ in mixing], wd, mixing_lr_scale))
    return [{"params": [p for _, p in members], "weight_decay": wd,
             "names": [n for n, _ in members], "lr_scale": scale}
            for members, wd, scale in groups if members]


def apply_hyperparameters(optimizer, groups: list[dict], betas, eps: float) -> None:
    """Set each group's weight decay, betas and eps from the config again: a loaded
    checkpoint brings its own groups' values (the learning rate is set every step)."""
    if len(optimizer.param_groups) != len(groups):
        raise RuntimeError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, "
                           f"the config makes {len(groups)}")
    for group, want in zip(optimizer.param_groups, groups, strict=True):
        group.update(weight_decay=want["weight_decay"], betas=tuple(betas), eps=eps)
