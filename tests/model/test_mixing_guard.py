"""Mc driven negative under normalize=True: the layer uses max(Mc, 0) (gradient straight
through), so the denominator phi(q).y + eps stays positive and the output finite; the
raw negative Mc would have divided by about zero. And a DiT run whose every Mc was
driven negative on purpose still trains with finite losses."""

import pytest
import torch

from tests.numerics import rel_err
from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_DIT_RUN, clips

B, N, HIDDEN, HEADS, HEAD_DIM, C = 1, 32, 16, 2, 8, 8
M = N // C


@pytest.fixture
def topology():
    from mhla_dist.parallel import build_topology, destroy_topology

    yield build_topology()
    destroy_topology()


def _layer(per_head: bool, normalize: bool = True):
    from mhla_dist.parallel.tp_layers import ParallelMHLAttention

    torch.manual_seed(0)
    return ParallelMHLAttention(HIDDEN, HEADS, HEAD_DIM, block_size=C, max_blocks=M,
                                causal=False, normalize=normalize, per_head_mixing=per_head)


def _cancelling_mixing(layer, x) -> torch.Tensor:
    """An Mc whose block row 0 makes `sum_b Mc[0, b] phi(q_t).z_b` cross zero inside
    block 0: Mc[0, 1] is chosen to cancel Mc[0, 0] = 1 for token 0."""
    from mhla_kernels import block_summaries

    with torch.no_grad():
        q, k, v = layer.features(x, torch.arange(N))
    _, z = block_summaries(k.double(), v.double(), C)  # z [B, M, H, d]
    qz = torch.einsum("hd,mhd->mh", q[0, 0].double(), z[0])  # token 0 with each block
    mixing = torch.eye(M, dtype=torch.float64)
    mixing[0, 1] = -qz[0, 0] / qz[1, 0]  # head 0, token 0: denominator ~ eps
    if layer.mixing.dim() == 3:
        mixing = mixing.expand(HEADS, M, M)
    return mixing.float()


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_negative_mixing_is_clamped_with_straight_through_gradient(topology, per_head):
    from mhla_kernels import mhla, mhla_reference

    layer = _layer(per_head)
    x = torch.randn(B, N, HIDDEN, generator=torch.Generator().manual_seed(1))
    mixing = _cancelling_mixing(layer, x)
    assert (mixing < 0).any()
    with torch.no_grad():
        layer.mixing.copy_(mixing)
    q, k, v = (t.detach() for t in layer.features(x, torch.arange(N)))
    raw = mhla(q.double(), k.double(), v.double(), mixing.double(), C)
    assert raw.abs().max() > 1e3, "the planted Mc should blow the raw output up"

    out = layer(x)
    assert torch.isfinite(out).all()
    twin = _layer(per_head)  # the same weights, with Mc clamped by hand
    with torch.no_grad():
        twin.mixing.copy_(mixing.clamp(min=0))
    assert rel_err(out, twin(x)) < 1e-6
    clamped = mixing.clamp(min=0).double().requires_grad_()
    ref_o = mhla_reference(q.double(), k.double(), v.double(), clamped, C)
    o = mhla(q, k, v, layer.effective_mixing(), C)
    assert rel_err(o, ref_o) < 1e-5
    # the gradient reaching a negative entry is the gradient at zero (straight through)
    g = torch.randn(ref_o.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (o.double() * g).sum().backward()
    (ref_o * g).sum().backward()
    assert rel_err(layer.mixing.grad.double(), clamped.grad) < 1e-4
    assert (layer.mixing.grad[mixing < 0] != 0).any()


def test_normalize_false_uses_mixing_as_is(topology):
    layer = _layer(False, normalize=False)
    with torch.no_grad():
        layer.mixing.fill_(-0.5)
    assert torch.equal(layer.effective_mixing(), layer.mixing)


def _negative_mixing(trainer):
    with torch.no_grad():
        for name, p in trainer.engine.module.named_parameters():
            if name.endswith("attn.mixing"):
                p.copy_(-p.abs() - 0.1)  # every entry negative


def test_dit_with_negative_mixing_trains(tmp_path):
    from tests.train.runs import losses, train_rank_fn

    run = [f"run_dir={tmp_path / 'run'}", "train.steps=4", "zero.stage=0", *clips(tmp_path)]
    r0 = run_ranks(train_rank_fn, 1, run, _negative_mixing, TINY_DIT_RUN)[0]
    curve = losses(r0)
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve))), curve
    mixing = [p for n, p in r0["params"].items() if n.endswith("attn.mixing")]
    assert mixing and all((p < 0).any() for p in mixing)
