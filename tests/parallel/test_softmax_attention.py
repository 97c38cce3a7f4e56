"""`ParallelSoftmaxAttention` equals quadratic softmax attention with an explicit mask: at
CP = 2 and 4 (each rank's output shard, the input and the weight gradients, float64) and
without CP (float32, bfloat16; prefill + decode equal the forward). No forward or backward
holds a mask or score tensor wider than the queries' own diagonal block."""

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

# hidden = 10 and heads x head_dim = 12 are no multiple of a shard's n = 8 or 16 tokens, so
# only a mask or a score block can end in [n, k n] (k > 1).
B, N, HIDDEN, HEADS, HEAD_DIM = 2, 32, 10, 2, 6


def make_layer(causal, tp_group=None, cp_group=None):
    from mhla_dist.parallel.softmax_attention import ParallelSoftmaxAttention

    torch.manual_seed(0)
    return ParallelSoftmaxAttention(HIDDEN, HEADS, HEAD_DIM, causal=causal, rotary_theta=100.0,
                                    output_gate=True, output_norm=True, tp_group=tp_group,
                                    cp_group=cp_group)


def reference(layer, x, causal):
    """The layer on the whole sequence, quadratic softmax with an explicit mask."""
    positions = torch.arange(x.shape[1])
    q, k, v = layer.project(x)
    q, k = layer.maybe_rotate(q, positions), layer.maybe_rotate(k, positions)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * HEAD_DIM**-0.5
    if causal:
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return layer.finish(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), x)


def inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(B, N, HIDDEN, generator=g, dtype=torch.float64) for _ in range(2))
    return x.to(dtype), dy.to(dtype)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op returns, and the ops' names."""

    def __init__(self):
        super().__init__()
        self.shapes, self.ops = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor))
        return out

    def wider_than_diagonal(self, n: int, total: int) -> list:
        """Shapes ending in `[n, k n]` or `[k n, n]` with `1 < k` and `k n <= total`."""
        wide = range(2 * n, total + 1, n)
        return sorted(s for s in self.shapes if len(s) >= 2 and (
            (s[-2] == n and s[-1] in wide) or (s[-1] == n and s[-2] in wide)))


def cp_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology

    topo = build_topology(cp=world)
    n = N // world
    sl = slice(topo.cp_rank * n, (topo.cp_rank + 1) * n)
    x, dy = inputs()
    errs, wide = {}, {}
    for causal in (False, True):
        tag = "causal" if causal else "noncausal"
        layer = make_layer(causal, topo.tp_group, topo.cp_group).double()
        names, params = zip(*layer.named_parameters(), strict=True)
        x_local = x[:, sl].clone().requires_grad_()
        with ShapeRecorder() as recorder:
            out = layer(x_local)
            grads = torch.autograd.grad(out, [x_local, *params], dy[:, sl])
        assert any("backward" in op for op in recorder.ops), sorted(recorder.ops)
        if causal:
            wide[tag] = recorder.wider_than_diagonal(n, N)
        x_full = x.clone().requires_grad_()
        ref = reference(layer, x_full, causal)
        ref_grads = torch.autograd.grad(ref, [x_full, *params], dy)
        errs[f"{tag}/out"] = rel_err(out, ref[:, sl])
        errs[f"{tag}/dx"] = rel_err(grads[0], ref_grads[0][:, sl])
        for name, g, ref_g in zip(names, grads[1:], ref_grads[1:], strict=True):
            # Each rank's weight gradient covers its tokens: the CP sum is the whole one.
            dist.all_reduce(g, group=topo.cp_group)
            errs[f"{tag}/d{name}"] = rel_err(g, ref_g, floor=1e-8)
    return errs, wide


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request):
    return request.param, run_ranks(cp_rank_fn, request.param)


def test_cp_softmax_attention_equals_masked_reference(cp_results):
    _, ranks = cp_results
    for rank, (errs, _) in enumerate(ranks):
        assert len(errs) == 2 * 8
        bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < 1e-12}
        assert not bad, f"rank {rank}: {bad}"


def test_cp_causal_attention_holds_no_mask_or_scores_over_all_keys(cp_results):
    world, ranks = cp_results
    for rank, (_, wide) in enumerate(ranks):
        assert not wide["causal"], (f"rank {rank} of {world}: tensors wider than its "
                                    f"{N // world} tokens' diagonal block: {wide['causal']}")


@pytest.fixture(scope="module")
def single_process():
    from mhla_dist.parallel import build_topology, destroy_topology

    topo = build_topology()
    yield topo
    destroy_topology()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "bf16"])
def test_causal_without_cp_equals_masked_reference(single_process, dtype, tol):
    layer, ref_layer = make_layer(True).to(dtype), make_layer(True).double()
    x, dy = inputs()
    x_low = x.to(dtype).requires_grad_()
    with ShapeRecorder() as recorder:
        out = layer(x_low)
        (dx,) = torch.autograd.grad(out, x_low, dy.to(dtype))
    square = sorted(s for s in recorder.shapes if s[-2:] == (N, N))
    assert not square, f"[N, N] tensors in the causal forward and backward: {square}"
    x_full = x.clone().requires_grad_()
    ref = reference(ref_layer, x_full, causal=True)
    (ref_dx,) = torch.autograd.grad(ref, x_full, dy)
    for name, got, want in (("out", out, ref), ("dx", dx, ref_dx)):
        err = rel_err(got, want)
        assert err < tol, f"{name} rel err {err:.2e} (tolerance {tol:.0e})"


def test_prefill_and_decode_equal_the_forward(single_process):
    layer = make_layer(True).double()
    x, _ = inputs()
    with torch.no_grad():
        full = layer(x)
    prompt = N // 2 + 3
    out, cache = layer.prefill(x[:, :prompt])
    steps = [layer.step(x[:, t:t + 1], cache) for t in range(prompt, N)]
    assert rel_err(torch.cat([out, *steps], 1), full) < 1e-12
