"""Full (TP-gathered) weights of a tensor-parallel module, and loading them back.

megatron-core marks split parameters with `tensor_model_parallel`, `partition_dim`; the
others are replicated on every TP rank. A vocab-parallel parameter's full tensor drops
its padding rows (`padded_rows_of`), and slicing it pads them back with zeros. The full
state is the same whatever the TP degree, so it is what checkpoints convert through and
what tests compare.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .collectives import all_gather_dim0


def split_dim(param: nn.Parameter) -> int | None:
    """The dim a parameter is split along over TP, or None when replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def padded_vocab(vocab_size: int, tp: int) -> int:
    """`vocab_size` rounded up to a multiple of `tp` (Megatron's vocabulary padding)."""
    return -(-vocab_size // tp) * tp


def pad_rows(full: torch.Tensor, tp: int, dim: int = 0) -> torch.Tensor:
    """`full` with zero rows appended along `dim` up to a multiple of `tp`: the padding a
    vocab-parallel parameter's shards hold."""
    shape = list(full.shape)
    shape[dim] = padded_vocab(full.shape[dim], tp) - full.shape[dim]
    return torch.cat([full, full.new_zeros(shape)], dim=dim) if shape[dim] else full


def full_rows(param: nn.Parameter, tp: int) -> int | None:
    """The full size of a split parameter's split dim: `tp` shards, less the padding of a
    vocab-parallel parameter (`padded_rows_of`, `vocab_parallel.py`); None if replicated."""
    dim = split_dim(param)
    if dim is None:
        return None
    return getattr(param, "padded_rows_of", None) or tuple(
        getattr(param, "ds_shape", param.shape))[dim] * tp


def gather_tp_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], tp_group):
    """Gather `{param name: local tensor}` (weights or their grads) to full tensors."""
    params = dict(module.named_parameters())
    out = {}
    for name, t in tensors.items():
        dim = split_dim(params[name])
        if dim is None or dist.get_world_size(tp_group) == 1:
            out[name] = t.detach().clone()
        else:
            full, _ = all_gather_dim0(t.detach().movedim(dim, 0), tp_group)
            rows = full_rows(params[name], dist.get_world_size(tp_group))
            out[name] = full[:rows].movedim(0, dim).contiguous()
    return out


def full_state_dict(module: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    return gather_tp_tensors(module, dict(module.named_parameters()), tp_group)


def full_grads(module: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in module.named_parameters()}
    return gather_tp_tensors(module, grads, tp_group)


def tp_slice(param: nn.Parameter, full: torch.Tensor, tp_group, name: str = "") -> torch.Tensor:
    """This TP rank's slice of the full tensor `full` of `param` (checked against its
    shape; a ZeRO-3 parameter's own shape is its `ds_shape`)."""
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    dim = split_dim(param)
    padded = getattr(param, "padded_rows_of", None)
    if dim is not None and padded is not None and full.shape[dim] == padded:
        full = pad_rows(full, tp, dim)
    local = full if dim is None else full.chunk(tp, dim=dim)[rank]
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if tuple(local.shape) != shape:
        raise ValueError(f"{name or 'parameter'}: full {tuple(full.shape)} gives "
                         f"{tuple(local.shape)} on TP rank {rank}/{tp}, the parameter is "
                         f"{shape}")
    return local


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], tp_group) -> None:
    """Copy this TP rank's slice of every full tensor in `state` into `module`."""
    for name, param in module.named_parameters():
        if name not in state:
            raise KeyError(f"{name} missing from the full state (has {sorted(state)})")
        param.copy_(tp_slice(param, state[name], tp_group, name))
