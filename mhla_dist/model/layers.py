"""Small layers shared by the models."""

from __future__ import annotations

import torch
from torch import nn

from mhla_dist.parallel.collectives import copy_to_group


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, computed in float32 at least.

    `grad_group`: the TP group when the norm sees only this rank's sequence shard
    (sequence parallelism): its gain's gradient is then summed over the group (Megatron
    marks such parameters `sequence_parallel` and all-reduces their gradients)."""

    def __init__(self, dim: int, eps: float = 1e-6, grad_group=None) -> None:
        super().__init__()
        self.eps, self.grad_group = eps, grad_group
        self.weight = nn.Parameter(torch.ones(dim))
        if grad_group is not None:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(dtype)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.grad_group is None else copy_to_group(self.weight,
                                                                           self.grad_group)
        return (x32 * weight.to(dtype)).to(x.dtype)
