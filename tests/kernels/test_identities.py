"""The identities of DESIGN §1, checked against plain linear attention written directly."""

import pytest
import torch

from mhla_kernels import mhla
from tests.kernels.inputs import make_inputs
from tests.numerics import rel_err


def linear_attention(q, k, v, *, causal, normalize, eps=1e-6, scale=None):
    """Plain (Katharopoulos) linear attention by prefix sums, independent of MHLA's code."""
    kv = torch.einsum("bnhd,bnhe->bnhde", k, v)
    if causal:
        kv, ksum = kv.cumsum(1), k.cumsum(1)
    else:
        kv, ksum = kv.sum(1, keepdim=True), k.sum(1, keepdim=True)
    num = torch.einsum("bnhd,bnhde->bnhe", q, kv)
    if not normalize:
        return num * (q.shape[-1] ** -0.5 if scale is None else scale)
    return num / ((q * ksum).sum(-1, keepdim=True) + eps)


CASES = [(False, True), (False, False), (True, True), (True, False)]
CASE_IDS = ["noncausal-norm", "noncausal-unnorm", "causal-norm", "causal-unnorm"]


@pytest.mark.parametrize("causal,normalize", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("block_size", [1, 16, 100], ids=lambda c: f"C{c}")
def test_ones_mixing_is_linear_attention(block_size, causal, normalize):
    q, k, v, _ = make_inputs(2, 300, 2, 8, 6, block_size)
    m = -(-300 // block_size)
    out = mhla(q, k, v, torch.ones(m, m, dtype=q.dtype), block_size, causal=causal,
               normalize=normalize)
    ref = linear_attention(q, k, v, causal=causal, normalize=normalize)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("causal,normalize", CASES, ids=CASE_IDS)
def test_identity_mixing_is_block_local_linear_attention(causal, normalize):
    c = 37
    q, k, v, _ = make_inputs(1, 200, 3, 8, 8, c)
    m = -(-200 // c)
    out = mhla(q, k, v, torch.eye(m, dtype=q.dtype), c, causal=causal, normalize=normalize)
    ref = torch.cat([
        linear_attention(q[:, s:s + c], k[:, s:s + c], v[:, s:s + c], causal=causal,
                         normalize=normalize)
        for s in range(0, 200, c)
    ], dim=1)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("causal,normalize", CASES, ids=CASE_IDS)
def test_single_block_is_linear_attention(causal, normalize):
    """M = 1: the one mixing weight cancels when normalised and scales otherwise."""
    q, k, v, _ = make_inputs(2, 500, 2, 8, 8, 500)
    w = 0.37
    out = mhla(q, k, v, torch.full((1, 1), w, dtype=q.dtype), 500, causal=causal,
               normalize=normalize)
    ref = linear_attention(q, k, v, causal=causal, normalize=normalize, eps=1e-6 / w)
    if not normalize:
        ref = ref * w
    assert rel_err(out, ref) < 1e-12
