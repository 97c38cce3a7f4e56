"""The LM on a packed batch with document offsets: its loss is the sum of the losses of
its documents run one at a time (MHLA, hybrid softmax layers, per-head Mc, rotary
restarting or not), the logits of each document do not depend on its neighbours, and
the offsets reach every layer under activation checkpointing."""

import pytest
import torch

from mhla_dist.parallel import build_topology, destroy_topology
from tests.model.lm_helpers import build
from tests.numerics import rel_err

# Two rows of 64: documents of 1, 20 (ragged blocks of 8), 43 tokens; 64 (8 whole
# blocks); a single token, then 63.
OFFSETS = torch.tensor([0, 1, 21, 64, 128])
ROWS = [(0, 1), (1, 21), (21, 64), (64, 128)]


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    topo = build_topology()
    yield topo
    destroy_topology()


def packed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (2, 64), generator=g)
    targets = torch.randint(0, 50, (2, 64), generator=g)
    # As the loader makes them: the last token of a document predicts nothing.
    flat = targets.view(-1)
    flat[OFFSETS[1:-1] - 1] = -100
    return tokens, targets


@pytest.mark.parametrize("overrides", [
    {}, {"softmax_layers": [1]}, {"rotary": False, "per_head_mixing": True},
    {"rope_per_document": False}, {"activation_checkpointing": True, "softmax_layers": [0]},
], ids=["mhla", "hybrid", "perhead-norope", "global-positions", "checkpointed"])
def test_packed_loss_is_the_sum_of_document_losses(overrides):
    model = build(**overrides)
    tokens, targets = packed_batch()
    total, count = model.loss(tokens, targets, cu_seqlens=OFFSETS)
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    want_total, want_count = 0.0, 0
    flat_tokens, flat_targets = tokens.reshape(1, -1), targets.reshape(1, -1)
    for s, e in ROWS:
        doc_total, doc_count = model.loss(flat_tokens[:, s:e], flat_targets[:, s:e])
        want_total, want_count = want_total + doc_total, want_count + doc_count
    want_grads = torch.autograd.grad(want_total, list(model.parameters()), allow_unused=True)
    assert count == want_count == 128 - 3
    assert rel_err(total, want_total) < 1e-12
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            assert rel_err(a, b, floor=1e-8) < 1e-10, name


def test_documents_do_not_see_each_other():
    model = build(softmax_layers=[1]).eval()
    tokens, _ = packed_batch()
    other = tokens.clone()
    other[0, 21:] = (other[0, 21:] + 7) % 50  # change the third document only
    a = model(tokens, cu_seqlens=OFFSETS)
    b = model(other, cu_seqlens=OFFSETS)
    assert torch.equal(a[0, :21], b[0, :21]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0, 21:], b[0, 21:])
    # Without the offsets the first documents do change the rest (and vice versa).
    assert not torch.allclose(model(tokens)[0, 30:], model(other)[0, 30:])
