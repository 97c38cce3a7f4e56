"""Collectives paired with their adjoints, as autograd Functions over torch.distributed.

Megatron-style regions: `gather_from_group` all-gathers forward and reduce-scatters the
gradient backward; `reduce_scatter_to_group` is its transpose; `copy_to_group` is the
identity with an all-reduced gradient. Both work on contiguous
buffers with `all_gather_single` / `reduce_scatter_single` (torch >= 2.13; the
deprecated `all_gather_into_tensor` / `reduce_scatter_tensor` before), so they run on
gloo (CPU) and NCCL (GPU) alike; `torch.distributed.nn.functional.all_gather` is avoided
because it returns wrong gradients on gloo for non-contiguous incoming gradients.

`comm_stats` counts the bytes every collective here moves (the size of the gathered
tensor for an all-gather, of the reduced input for a reduce-scatter), so benchmarks and
metrics can report them.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommStats:
    """Bytes and calls per collective kind, on this rank."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in self.bytes}


comm_stats = CommStats()


@contextmanager
def counting_bytes():
    """Reset `comm_stats`, yield it, and leave the counts of the block in it."""
    comm_stats.reset()
    yield comm_stats


# torch 2.13 renamed the single-buffer collectives and warns on every call of the old
# names; the old names are all that older releases have.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


def _size(group) -> int:
    return dist.get_world_size(group)


def all_gather_dim0(x: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's `x` along dim 0; returns (out, work or None)."""
    x = x.contiguous()
    out = x.new_empty((_size(group) * x.shape[0], *x.shape[1:]))
    work = _all_gather_single(out, x, group=group, async_op=async_op)
    comm_stats.record("all_gather", out)
    return out, work


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Sum `x` over the ranks and keep this rank's slice of dim 0."""
    x = x.contiguous()
    p = _size(group)
    if x.shape[0] % p:
        raise ValueError(f"reduce-scatter of dim 0 = {x.shape[0]} over {p} ranks: not divisible")
    out = x.new_empty((x.shape[0] // p, *x.shape[1:]))
    _reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
    comm_stats.record("reduce_scatter", x)
    return out


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        out, _ = all_gather_dim0(x.movedim(dim, 0), group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad.movedim(ctx.dim, 0), ctx.group).movedim(0, ctx.dim), \
            None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_dim0(x.movedim(dim, 0), group).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        out, _ = all_gather_dim0(grad.movedim(ctx.dim, 0), ctx.group)
        return out.movedim(0, ctx.dim), None, None


class _GatheredFrom(torch.autograd.Function):
    """Attach an already gathered buffer to the autograd graph of the local piece."""

    @staticmethod
    def forward(ctx, x, gathered, dim, group):
        ctx.dim, ctx.group = dim, group
        return gathered.movedim(0, dim).clone()

    @staticmethod
    def backward(ctx, grad):
        local = reduce_scatter_dim0(grad.movedim(ctx.dim, 0), ctx.group).movedim(0, ctx.dim)
        return local, None, None, None


def gather_from_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather along `dim` (forward); reduce-scatter the gradient (backward)."""
    if _size(group) == 1:
        return x
    return _GatherFromGroup.apply(x, dim, group)


def reduce_scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Reduce-scatter along `dim` (forward); all-gather the gradient (backward)."""
    if _size(group) == 1:
        return x
    return _ReduceScatterToGroup.apply(x, dim, group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        comm_stats.record("all_reduce", grad)
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward.

    For a parameter replicated over a group whose ranks use it on different data (the
    shared `Mc` on tensor-parallel ranks, which hold different heads): every rank then
    holds the whole gradient, and the replicas stay equal.
    """
    if _size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


class PendingGather:
    """An all-gather in flight: start it, compute something else, then `wait()`.

    The result is differentiable with respect to the local piece: its gradient is
    reduce-scattered back to the owners, as with `gather_from_group`.
    """

    def __init__(self, x: torch.Tensor, dim: int, group) -> None:
        self._x, self._dim, self._group = x, dim, group
        if _size(group) == 1:
            self._out, self._work = None, None
        else:
            self._out, self._work = all_gather_dim0(x.detach().movedim(dim, 0), group,
                                                    async_op=True)

    def wait(self) -> torch.Tensor:
        if self._out is None:
            return self._x
        self._work.wait()
        return _GatheredFrom.apply(self._x, self._out, self._dim, self._group)


def start_gather(x: torch.Tensor, dim: int, group) -> PendingGather:
    """Begin an all-gather of `x` along `dim` without waiting for it."""
    return PendingGather(x, dim, group)
