"""`cp_mhla` copies the gathered summaries no more than the collective needs (#15).

Counted by a `TorchDispatchMode` on each gloo rank, only between the operator's stages:
in forward from the return of `block_summaries` to the call of `mix_summaries` (less
`block_outputs_intra`, run while the gather is in flight); in backward while the autograd
nodes between the mix's inputs and `block_summaries`' outputs run (and the engine adds
their gradients up). Two kinds of op are counted, by the bytes of what they write:
- moved: copies, concatenations, layout changes, fills (`COPYING`);
- allocated: uninitialised buffers (`ALLOCATING`): a collective's, or one a copy fills.
Arithmetic is not counted, nor is what a collective call writes or copies inside (gloo's
reduce-scatter copies its result), nor the stages' own work.

What the collective needs, with `K = d * dv + d` packed values per block and head:
forward, one send buffer of the `m` local blocks packed (moved and allocated, `B m H K`)
and the receive buffer of all `M` (allocated, `B M H K`); backward, the gradient of the
`M` gathered blocks packed in the collective's layout (moved and allocated, `B M H K`)
and the reduce-scatter's output (allocated, `B m H K`).
"""

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.parallel.harness import run_ranks

aten = torch.ops.aten
B, H, D, DV, M, C = 2, 3, 4, 5, 8, 4
K = D * DV + D

COPYING = {
    aten.clone, aten.copy_, aten._to_copy, aten.cat, aten.stack, aten.constant_pad_nd,
    aten.index, aten.index_select, aten.gather, aten.narrow_copy, aten.slice_backward,
    aten.select_backward, aten.as_strided_scatter, aten.slice_scatter, aten.select_scatter,
    aten.permute_copy, aten.expand_copy, aten.view_copy, aten.transpose_copy,
    aten.zero_, aten.fill_, aten.zeros, aten.zeros_like, aten.new_zeros,
}
ALLOCATING = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
              aten.new_empty_strided}


def _bytes(out) -> int:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))


class CopyCounter(TorchDispatchMode):
    """Bytes written by copying and allocating ops while `active`."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.moved = self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            if func.overloadpacket in COPYING:
                self.moved += _bytes(out)
            elif func.overloadpacket in ALLOCATING:
                self.allocated += _bytes(out)
        return out

    def take(self) -> dict[str, int]:
        seen = {"moved": self.moved, "allocated": self.allocated}
        self.moved = self.allocated = 0
        return seen


@contextmanager
def counting_between_stages(counter: CopyCounter, seen: dict):
    """Switch `counter` on from `block_summaries` to `mix_summaries` in cp_mhla's forward
    (off in `block_outputs_intra` and inside the collective calls); note the stages'
    tensors in `seen` (`summaries`, `gathered`) for the backward region."""
    from unittest import mock

    from mhla_dist.parallel import collectives, cp_attention

    def after(stage):
        def call(*args, **kwargs):
            seen["summaries"] = stage(*args, **kwargs)
            counter.active = True
            return seen["summaries"]
        return call

    def before(stage):
        def call(s, z, *args, **kwargs):
            counter.active = False
            seen["gathered"] = (s, z)
            return stage(s, z, *args, **kwargs)
        return call

    def paused(fn):
        def call(*args, **kwargs):
            active, counter.active = counter.active, False
            try:
                return fn(*args, **kwargs)
            finally:
                counter.active = active
        return call

    def patch(module, name, wrap):
        return mock.patch.object(module, name, wrap(getattr(module, name)))

    with patch(cp_attention, "block_summaries", after), \
            patch(cp_attention, "block_outputs_intra", paused), \
            patch(cp_attention, "mix_summaries", before), \
            patch(collectives, "_all_gather_single", paused), \
            patch(collectives, "_reduce_scatter_single", paused):
        yield


def _graph(root) -> set:
    nodes, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return nodes


def count_backward_between_stages(counter: CopyCounter, out, seen: dict) -> None:
    """Hook every autograd node under `out`: the counter is on while a node between the
    mix's inputs and `block_summaries`' outputs runs (and while the engine adds up what
    it returned), off while any other node runs. `seen["region_runs"]` counts the former."""
    stops = {t.grad_fn for t in seen["summaries"]}
    region, stack = set(), [t.grad_fn for t in seen["gathered"]]
    while stack:  # every node reachable from the mix's inputs without passing the stops
        node = stack.pop()
        if node is None or node in stops or node in region:
            continue
        region.add(node)
        stack.extend(n for n, _ in node.next_functions)
    seen["region_runs"] = 0

    def switch(on):
        def hook(grad_outputs):
            counter.active = on
            seen["region_runs"] += on
        return hook

    for node in _graph(out.grad_fn):
        node.register_prehook(switch(node in region))


def copies_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology, cp_mhla

    topo = build_topology(cp=world)
    local = M * C // world
    results = {}
    for causal in (False, True):
        g = torch.Generator().manual_seed(rank)
        q, k = (torch.rand(B, local, H, D, generator=g).requires_grad_() for _ in range(2))
        v = torch.randn(B, local, H, DV, generator=g).requires_grad_()
        mixing = torch.rand(M, M, requires_grad=True)
        counter, seen = CopyCounter(), {}
        with counter, counting_between_stages(counter, seen):
            o = cp_mhla(q, k, v, mixing, C, causal=causal, group=topo.cp_group)
            forward = counter.take()
            count_backward_between_stages(counter, o, seen)
            o.sum().backward()
            counter.active = False
            backward = counter.take()
        results[causal] = {"forward": forward, "backward": backward,
                           "region_runs": seen["region_runs"]}
    return results


@pytest.mark.parametrize("world", [2, 4], ids=["cp2", "cp4"])
def test_cp_mhla_copies_only_what_the_collective_needs(world):
    local = B * (M // world) * H * K * 4  # float32 summaries of this rank's blocks, packed
    gathered = B * M * H * K * 4  # ... and of all blocks
    for rank, results in enumerate(run_ranks(copies_rank_fn, world)):
        for causal, seen in results.items():
            fwd, bwd, where = seen["forward"], seen["backward"], (rank, causal)
            assert seen["region_runs"] > 0, where  # the backward region was found
            assert fwd["moved"] <= local, (where, fwd)
            assert fwd["allocated"] <= local + gathered, (where, fwd)
            assert bwd["moved"] <= gathered, (where, bwd)
            assert bwd["allocated"] <= gathered + local, (where, bwd)
