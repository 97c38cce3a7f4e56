"""Softmax attention within packed documents (`cu_seqlens`) equals SDPA run on every
document alone: `document_attention` at CP = 1, 2, 4 (each rank's queries against the whole
rows, float64 outputs and q, k, v gradients), reading only the keys its rank can see; and
`ParallelSoftmaxAttention(x, cu_seqlens, positions)` without CP and on 2 and 4 gloo ranks
(each rank's output shard, the input and weight gradients). Without offsets the layer is
unchanged; bad offsets raise."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mhla_dist.parallel.softmax_attention import (
    cp_causal_attention,
    document_attention,
    document_key_range,
)
from mhla_dist.parallel.tp_layers import rotate
from mhla_kernels.packing import document_positions
from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

B, N, HEADS, D, DV = 2, 48, 2, 4, 5  # CP = 4 gives each rank n = 12 queries per row


def offsets(rows: list[list[int]]) -> torch.Tensor:
    """`cu_seqlens` over the flattened `B * N` tokens from each row's document lengths."""
    lengths = [length for row in rows for length in row]
    assert all(sum(row) == N for row in rows), rows
    return torch.cumsum(torch.tensor([0, *lengths]), 0)


def random_rows(seed: int) -> list[list[int]]:
    """Two rows of random document lengths, a third of them length 1, the rest up to N/2."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row = []
        while sum(row) < N:
            short = torch.rand((), generator=g) < 1 / 3
            length = 1 if short else int(torch.randint(2, N // 2, (), generator=g))
            row.append(min(length, N - sum(row)))
        rows.append(row)
    assert 1 in rows[0] + rows[1]
    return rows


LAYOUTS = {
    "random": random_rows(0),
    "random-many-short": random_rows(5),
    # documents crossing one, two and three rank boundaries (CP = 4: 12 tokens a rank)
    "crossing": [[1, 30, 1, 1, 15], [5, 40, 1, 1, 1]],
    # every rank boundary (multiples of 12) starts a document: no rank reads earlier keys
    "local-starts": [[12, 1, 11, 5, 7, 12], [3, 9, 12, 12, 1, 1, 10]],
    # one document per row: the mask-free kernels
    "one-per-row": [[N], [N]],
    # one document over each rank's visible keys, at CP = 2, 4 (prefix + diagonal kernels)
    "long": [[2, 46], [1, 1, 46]],
}


def per_document(q, k, v, cu, causal, theta=None):
    """SDPA on every document alone (rotary from position 0 when `theta`), `[B, N, H, *]`."""
    flat = [t.reshape(B * N, *t.shape[2:]) for t in (q, k, v)]
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qd, kd, vd = (t[start:end][None] for t in flat)
        if theta is not None:
            qd, kd = (rotate(t, torch.arange(end - start), theta) for t in (qd, kd))
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qd, kd, vd)),
                                           is_causal=causal)
        out.append(o.transpose(1, 2)[0])
    return torch.cat(out).view(B, N, *out[0].shape[1:])


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, N, HEADS, D), (B, N, HEADS, D), (B, N, HEADS, DV), (B, N, HEADS, DV))
    return (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)


def all_ranks(q, k, v, cu, cp, causal):
    """Every CP rank's output shard (its queries against the whole rows), concatenated."""
    n = N // cp
    return torch.cat([document_attention(q[:, r * n:(r + 1) * n], k, v, cu, rank=r, cp=cp,
                                         causal=causal) for r in range(cp)], 1)


@pytest.mark.parametrize("cp", [1, 2, 4], ids=["cp1", "cp2", "cp4"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_document_attention_equals_sdpa_per_document(layout, causal, cp):
    cu = offsets(LAYOUTS[layout])
    q, k, v, do = qkv()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    # k, v are shared by the ranks: their gradients sum, as the CP reduce-scatter does.
    got = all_ranks(q, k, v, cu, cp, causal)
    got_grads = torch.autograd.grad(got, leaves, do)
    want = per_document(q, k, v, cu, causal)
    want_grads = torch.autograd.grad(want, leaves, do)
    errs = {"out": rel_err(got, want)}
    errs.update({f"d{name}": rel_err(g, w)
                 for name, g, w in zip("qkv", got_grads, want_grads, strict=True)})
    bad = {name: f"{err:.2e}" for name, err in errs.items() if not err < 1e-12}
    assert not bad, f"{layout}, cp={cp}: {bad}"


def test_document_key_range():
    # row 0 starts documents at 0, 1, 31, 32, 33; row 1 at 0, 5, 45, 46, 47
    cu = offsets(LAYOUTS["crossing"])
    n = 12
    # causal: from the earliest document start of the rank's first queries, to its last token
    assert [document_key_range(cu, B, n, r, 4)[:2] for r in range(4)] == [
        (0, 12), (1, 24), (1, 36), (5, 48)]
    # non-causal: to the end of the latest document of its last queries
    assert [document_key_range(cu, B, n, r, 4, causal=False)[:2] for r in range(4)] == [
        (0, 45), (1, 45), (1, 48), (5, 48)]
    cu = offsets(LAYOUTS["local-starts"])
    assert [document_key_range(cu, B, n, r, 4)[:2] for r in range(4)] == [
        (0, 12), (12, 24), (24, 36), (36, 48)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", ["crossing", "local-starts", "long", "random"])
def test_keys_outside_the_visible_range_are_not_read_and_get_no_gradient(layout, causal):
    """NaN in every key and value a rank cannot see leaves its output finite and exact (a
    masked-out NaN would poison SDPA's softmax); their gradients are exactly zero."""
    cu, cp, n = offsets(LAYOUTS[layout]), 4, N // 4
    q, k, v, do = qkv()
    for rank in range(cp):
        lo, hi, _ = document_key_range(cu, B, n, rank, cp, causal=causal)
        if layout == "local-starts" and causal:
            assert lo == rank * n, f"rank {rank} reads keys from {lo}"
        k_nan, v_nan = k.clone(), v.clone()
        for t in (k_nan, v_nan):
            t[:, :lo], t[:, hi:] = float("nan"), float("nan")
        leaves = [q[:, rank * n:(rank + 1) * n].clone(), k_nan, v_nan]
        leaves = [t.requires_grad_() for t in leaves]
        out = document_attention(*leaves, cu, rank=rank, cp=cp, causal=causal)
        _, dk, dv = torch.autograd.grad(out, leaves, do[:, rank * n:(rank + 1) * n])
        want = per_document(q, k, v, cu, causal)[:, rank * n:(rank + 1) * n]
        assert rel_err(out, want) < 1e-12, f"rank {rank}: keys [{lo}, {hi})"
        for name, g in (("dk", dk), ("dv", dv)):
            assert torch.isfinite(g).all(), f"rank {rank}: {name} not finite"
            outside = torch.cat([g[:, :lo], g[:, hi:]], 1)
            assert not outside.any(), f"rank {rank}: {name} non-zero outside [{lo}, {hi})"


class OpRecorder(TorchDispatchMode):
    """Records the ops run and the shapes of the boolean matrices they return."""

    def __init__(self):
        super().__init__()
        self.ops, self.bool_shapes = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.dim() >= 2:
                self.bool_shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_one_document_per_row_builds_no_mask(rank):
    """The mask-free kernels of the layer without offsets (the prefix kernel of ranks > 0
    needs `dv == d` on CPU; with `dv != d` the masked path runs, tested above)."""
    cu, cp, n = offsets(LAYOUTS["one-per-row"]), 4, N // 4
    q, k, v, _ = qkv()
    q, v = q[:, rank * n:(rank + 1) * n], v[..., :D]
    with OpRecorder() as recorder:
        out = document_attention(q, k, v, cu, rank=rank, cp=cp)
    assert not recorder.bool_shapes, sorted(recorder.bool_shapes)
    assert "searchsorted" not in recorder.ops
    assert rel_err(out, cp_causal_attention(q, k, v, rank)) < 1e-14


@pytest.mark.parametrize("cu,match", [
    ([0, 10, 96], "row boundary"),
    ([1, 48, 96], "start at 0"),
    ([0, 48, 90], "end at"),
    ([0, 48, 48, 96], "strictly increasing"),
    ([0, 30, 20, 48, 96], "strictly increasing"),
    ([[0, 48, 96]], "shape"),
], ids=["row-boundary", "start", "end", "empty-doc", "decreasing", "2-d"])
def test_bad_offsets_raise(cu, match):
    q, k, v, _ = qkv()
    with pytest.raises(ValueError, match=match):
        document_attention(q, k, v, torch.tensor(cu))


def test_bad_shapes_raise():
    q, k, v, _ = qkv()
    cu = offsets(LAYOUTS["random"])
    with pytest.raises(TypeError, match="integers"):
        document_attention(q, k, v, cu.double())
    with pytest.raises(ValueError, match="whole rows"):
        document_attention(q[:, :12], k, v, cu, rank=0, cp=2)
    with pytest.raises(ValueError, match="rank=2"):
        document_attention(q[:, :24], k, v, cu, rank=2, cp=2)


# The layer: hidden = 10, heads x head_dim = 12, as in test_softmax_attention.py.
HIDDEN, LAYER_HEADS, HEAD_DIM, THETA = 10, 2, 6, 100.0
LAYER_LAYOUTS = ["random", "crossing", "local-starts", "one-per-row"]


def make_layer(causal, tp_group=None, cp_group=None):
    from mhla_dist.parallel.softmax_attention import ParallelSoftmaxAttention

    torch.manual_seed(0)
    return ParallelSoftmaxAttention(HIDDEN, LAYER_HEADS, HEAD_DIM, causal=causal,
                                    rotary_theta=THETA, output_gate=True, output_norm=True,
                                    tp_group=tp_group, cp_group=cp_group).double()


def layer_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, N, HIDDEN, generator=g, dtype=torch.float64) for _ in range(2))


def layer_reference(layer, x, cu, causal):
    """The layer on every document alone, rotary positions restarting at each."""
    q, k, v = layer.project(x)
    return layer.finish(per_document(q, k, v, cu, causal, THETA), x)


def layer_errors(layer, x, dy, cu, causal, sl, cp_group=None) -> dict:
    """Relative errors of the layer's shard `sl` (output, dx, every weight gradient summed
    over `cp_group`) against the per-document reference."""
    names, params = zip(*layer.named_parameters(), strict=True)
    positions = document_positions(cu).view(B, N)[:, sl]
    x_local = x[:, sl].clone().requires_grad_()
    out = layer(x_local, cu, positions=positions)
    grads = torch.autograd.grad(out, [x_local, *params], dy[:, sl])
    x_full = x.clone().requires_grad_()
    ref = layer_reference(layer, x_full, cu, causal)
    ref_grads = torch.autograd.grad(ref, [x_full, *params], dy)
    errs = {"out": rel_err(out, ref[:, sl]), "dx": rel_err(grads[0], ref_grads[0][:, sl])}
    for name, g, ref_g in zip(names, grads[1:], ref_grads[1:], strict=True):
        if cp_group is not None:
            dist.all_reduce(g, group=cp_group)
        errs[f"d{name}"] = rel_err(g, ref_g, floor=1e-8)
    return errs


def without_offsets_errors(layer, x, sl) -> float:
    """The layer without offsets against one document per row at global positions."""
    with torch.no_grad():
        plain = layer(x[:, sl])
        rows = layer(x[:, sl], offsets(LAYOUTS["one-per-row"]))
    return rel_err(plain, rows)


@pytest.fixture(scope="module")
def single_process():
    from mhla_dist.parallel import build_topology, destroy_topology

    topo = build_topology()
    yield topo
    destroy_topology()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", LAYER_LAYOUTS)
def test_layer_equals_layer_per_document(single_process, layout, causal):
    layer, (x, dy) = make_layer(causal), layer_inputs()
    errs = layer_errors(layer, x, dy, offsets(LAYOUTS[layout]), causal, slice(0, N))
    bad = {name: f"{err:.2e}" for name, err in errs.items() if not err < 1e-12}
    assert not bad, bad


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_layer_without_offsets_is_unchanged(single_process, causal):
    layer, (x, _) = make_layer(causal), layer_inputs()
    assert without_offsets_errors(layer, x, slice(0, N)) < 1e-14
    with pytest.raises(ValueError, match="positions has shape"):
        layer(x, offsets(LAYOUTS["random"]), positions=torch.zeros(B, N - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="row boundary"):
        layer(x, torch.tensor([0, 10, 2 * N]))


def cp_rank_fn(rank, world):
    from mhla_dist.parallel import build_topology

    topo = build_topology(cp=world)
    n = N // world
    sl = slice(topo.cp_rank * n, (topo.cp_rank + 1) * n)
    x, dy = layer_inputs()
    errs = {}
    for causal in (True, False):
        tag = "causal" if causal else "noncausal"
        layer = make_layer(causal, topo.tp_group, topo.cp_group)
        for layout in LAYER_LAYOUTS:
            found = layer_errors(layer, x, dy, offsets(LAYOUTS[layout]), causal, sl,
                                 topo.cp_group)
            errs.update({f"{tag}/{layout}/{name}": err for name, err in found.items()})
        errs[f"{tag}/no-offsets"] = without_offsets_errors(layer, x, sl)
    return errs


@pytest.mark.parametrize("world", [2, 4], ids=["cp2", "cp4"])
def test_cp_layer_equals_layer_per_document(world):
    for rank, errs in enumerate(run_ranks(cp_rank_fn, world)):
        assert len(errs) == 2 * (len(LAYER_LAYOUTS) * 8 + 1)
        bad = {name: f"{err:.2e}" for name, err in errs.items() if not err < 1e-12}
        assert not bad, f"rank {rank} of {world}: {bad}"
