"""Collectives paired with their adjoints, as autograd Functions over torch.distributed.

Megatron-style regions: `gather_from_group` all-gathers forward and reduce-scatters the
gradient backward; `reduce_scatter_to_group` is its transpose; `copy_to_group` is the
identity with an all-reduced gradient. Both work on contiguous
buffers with `all_gather_single` / `reduce_scatter_single` (torch >= 2.13; the
deprecated `all_gather_into_tensor` / `reduce_scatter_tensor` before), so they run on
gloo (CPU) and NCCL (GPU) alike; `torch.distributed.nn.functional.all_gather` is avoided
because it returns wrong gradients on gloo for non-contiguous incoming gradients.

`start_gather` begins an all-gather to overlap with other work; `start_gather_packed`
gathers several tensors (context parallelism's `S` and `z`) as one buffer, copied once
into its send buffer and handed on as views of the received one, and packs their
gradients into one buffer for the reduce-scatter: one copy each way, of what moves.

`comm_stats` counts the bytes every collective here moves (the size of the gathered
tensor for an all-gather, of the reduced input for a reduce-scatter), so benchmarks and
metrics can report them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
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
    """Attach an already gathered buffer (dim 0 the gathered dim) to the autograd graph of
    the local piece. The buffer is returned itself: it is not an input of the Function,
    so it needs no copy to become an output."""

    @staticmethod
    def forward(ctx, x, pending, dim):
        ctx.dim, ctx.group = dim, pending.group
        return pending.received()

    @staticmethod
    def backward(ctx, grad):
        local = reduce_scatter_dim0(grad, ctx.group).movedim(0, ctx.dim)
        return local, None, None


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


class _GatherForReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.width = dim, group, x.shape[dim]
        out, _ = all_gather_dim0(x.movedim(dim, 0), group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank(ctx.group) * ctx.width
        return grad.narrow(ctx.dim, start, ctx.width).contiguous(), None, None


def gather_for_replicated(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather along `dim` (forward); backward keeps this rank's slice of the gradient.

    For a gathered tensor whose consumers compute the same thing on every rank (a loss
    replicated over the group): each rank's gradient is then already the whole one, and
    summing it (`gather_from_group`'s reduce-scatter) would count it once per rank.
    """
    if _size(group) == 1:
        return x
    return _GatherForReplicated.apply(x, dim, group)


class _SplitToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        width = x.shape[dim] // _size(group)
        return x.narrow(dim, dist.get_rank(group) * width, width).contiguous()

    @staticmethod
    def backward(ctx, grad):
        out, _ = all_gather_dim0(grad.movedim(ctx.dim, 0), ctx.group)
        return out.movedim(0, ctx.dim), None, None


def split_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's slice of a tensor replicated over the group, along `dim` (forward);
    all-gather of the gradient (backward), so the replicated computation upstream gets
    the whole gradient on every rank. The transpose of `gather_for_replicated`."""
    if _size(group) == 1:
        return x
    if x.shape[dim] % _size(group):
        raise ValueError(f"split of dim {dim} = {x.shape[dim]} over {_size(group)} ranks: "
                         "not divisible")
    return _SplitToGroup.apply(x, dim, group)


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


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        comm_stats.record("all_reduce", out)
        return out

    backward = staticmethod(_CopyToGroup.backward)  # the sum of every rank's output gradient


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group of every rank's `x` (forward), differentiable: each rank's
    output feeds its own computation, so the gradient of each input is the sum of all the
    ranks' output gradients (an all-reduce backward too). E.g. a norm over channels that
    tensor parallelism splits (Wan's q/k RMSNorm across heads)."""
    if _size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class PendingGather:
    """An all-gather in flight: start it, compute something else, then `wait()`.

    The result is differentiable with respect to the local piece: its gradient is
    reduce-scattered back to the owners, as with `gather_from_group`.
    """

    def __init__(self, x: torch.Tensor, dim: int, group) -> None:
        self._x, self._dim, self.group = x, dim, group
        if _size(group) == 1:
            self._out, self._work = None, None
        else:
            self._out, self._work = all_gather_dim0(x.detach().movedim(dim, 0), group,
                                                    async_op=True)

    def received(self) -> torch.Tensor:
        """The gathered buffer (dim 0 gathered), once; only for `_GatheredFrom`."""
        out, self._out = self._out, None
        return out

    def wait(self) -> torch.Tensor:
        if self._work is None:
            return self._x
        self._work.wait()
        return _GatheredFrom.apply(self._x, self, self._dim).movedim(0, self._dim)


def start_gather(x: torch.Tensor, dim: int, group) -> PendingGather:
    """Begin an all-gather of `x` along `dim` without waiting for it."""
    return PendingGather(x, dim, group)


class _PackedLayout:
    """Where each of several tensors sits in one buffer `[n, *rest, width]`: the shared
    leading dims with the gathered one first, then every part's trailing dims flattened,
    side by side. Views of such a buffer take the parts' shapes (strided)."""

    def __init__(self, parts, dim: int, lead: int) -> None:
        shared = parts[0].shape[:lead]
        if not 0 <= dim < lead or any(p.shape[:lead] != shared for p in parts):
            raise ValueError(
                f"packed gather of shapes {[tuple(p.shape) for p in parts]} along dim {dim}: "
                f"the parts must share their first lead={lead} dims, and dim be one of them"
            )
        if any(p.dtype != parts[0].dtype or p.device != parts[0].device for p in parts):
            raise ValueError("packed gather: the parts must share one dtype and device")
        self.dim, self.rest = dim, tuple(shared[:dim] + shared[dim + 1:])
        self.trails = [tuple(p.shape[lead:]) for p in parts]
        self.widths = [math.prod(t) for t in self.trails]
        self.dtype, self.device = parts[0].dtype, parts[0].device

    def new_buffer(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.rest, sum(self.widths)), dtype=self.dtype,
                           device=self.device)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """The parts' views of `buf` (`[n, *rest, width]`), shaped like the parts with `n`
        in place of the gathered dim."""
        out, start = [], 0
        for trail, width in zip(self.trails, self.widths, strict=True):
            piece = buf[..., start : start + width].view(*buf.shape[:-1], *trail)
            out.append(piece.movedim(0, self.dim))
            start += width
        return out


class _GatheredPacked(torch.autograd.Function):
    """The received buffer of a packed gather as views, one per part, attached to the
    autograd graph of the local parts. The views are of a buffer that is no input of the
    Function, so they need no copy (and, as outputs of a Function, must not be modified
    in place). Backward packs the parts' gradients into one buffer of the collective's
    layout, the only copy, and reduce-scatters it; the local gradients are views of the
    result."""

    @staticmethod
    def forward(ctx, pending, *parts):
        ctx.layout, ctx.group = pending.layout, pending.group
        ctx.set_materialize_grads(False)  # an unused part's gradient is zeroed in place
        received = pending.received()
        ctx.gathered = received.shape[0]
        return tuple(pending.layout.views(received))

    @staticmethod
    def backward(ctx, *grads):
        # Every rank reduce-scatters, whichever gradients it has.
        packed = ctx.layout.new_buffer(ctx.gathered)
        for piece, grad in zip(ctx.layout.views(packed), grads, strict=True):
            if grad is None:
                piece.zero_()
            else:
                piece.copy_(grad)
        local = reduce_scatter_dim0(packed, ctx.group)
        return (None, *ctx.layout.views(local))


class PendingPackedGather:
    """Several tensors all-gathered as one buffer, in flight: see `start_gather_packed`."""

    def __init__(self, parts: Sequence[torch.Tensor], dim: int, group, lead: int) -> None:
        self._parts, self.group = tuple(parts), group
        self.layout = _PackedLayout(self._parts, dim, lead)
        self._out, self._work = None, None
        if _size(group) > 1:
            send = self.layout.new_buffer(self._parts[0].shape[dim])
            with torch.no_grad():  # the send buffer is no part of the graph: see wait()
                for piece, part in zip(self.layout.views(send), self._parts, strict=True):
                    piece.copy_(part)
            self._out, self._work = all_gather_dim0(send, group, async_op=True)

    def received(self) -> torch.Tensor:
        """The gathered buffer, once; only for `_GatheredPacked`."""
        out, self._out = self._out, None
        return out

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self._work is None:
            return self._parts
        self._work.wait()
        return _GatheredPacked.apply(self, *self._parts)


def start_gather_packed(
    parts: Sequence[torch.Tensor], dim: int, group, *, lead: int
) -> PendingPackedGather:
    """Begin one all-gather of several tensors along `dim`, packed into one buffer.

    The parts share their first `lead` dims (`dim` among them), dtype and device; each
    part's other dims are flattened and the parts laid side by side in a send buffer
    `[n, *others, width]` with the gathered dim first. Packing it is the one copy: the
    receive buffer `[P n, *others, width]` is then in rank order along dim 0 with no
    reordering. `wait()` returns one view of it per part, shaped like the part with `dim`
    P times longer (strided; not to be modified in place), and differentiable with
    respect to the parts: backward packs their gradients into one buffer of the same
    layout (the one copy) and reduce-scatters it back to the owners.
    """
    return PendingPackedGather(parts, dim, group, lead)
