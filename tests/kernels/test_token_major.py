"""The copy-free token-major products (whole blocks, inputs in the compute dtype) against
the quadratic reference: batches of two, dv != d, shared and per-head Mc, normalised and
not, every gradient; and the heads-first path still serves what they do not fit."""

import pytest

from mhla_kernels import mhla, mhla_reference
from tests.kernels.inputs import make_inputs
from tests.numerics import assert_grads_close, rel_err


@pytest.fixture
def calls(monkeypatch):
    from mhla_kernels import token_major

    seen = []
    for name in ("summaries", "summaries_bwd", "noncausal_outputs", "noncausal_outputs_bwd"):
        real = getattr(token_major, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(token_major, name, spy)
    return seen


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "perhead"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_whole_blocks_take_the_token_major_products(calls, causal, normalize, per_head):
    b, n, h, d, dv, c = 2, 96, 3, 8, 5, 16
    inputs = [t.requires_grad_() for t in make_inputs(b, n, h, d, dv, c, per_head=per_head)]
    kw = dict(causal=causal, normalize=normalize)
    out = mhla(*inputs, c, **kw, backend="torch")
    ref = mhla_reference(*inputs, c, **kw)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, inputs, tol=1e-10)
    expect = {"summaries", "summaries_bwd"} | (
        set() if causal else {"noncausal_outputs", "noncausal_outputs_bwd"})
    assert set(calls) == expect


def test_strided_or_ragged_inputs_take_the_heads_first_path(calls):
    b, n, h, d, c = 1, 64, 2, 8, 16
    q, k, v, mixing = make_inputs(b, n, h, d, d, c)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # not contiguous
    k, v = k.requires_grad_(), v.requires_grad_()
    out = mhla(q_t, k, v, mixing, c, backend="torch")
    ref = mhla_reference(q_t, k, v, mixing, c)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, [q_t, k, v], tol=1e-10, names=("q", "k", "v"))
    assert "noncausal_outputs" not in calls and "summaries" in calls  # k, v still fit
    calls.clear()
    ragged = [t[:, :60].detach().clone().requires_grad_() for t in (q, k, v)]
    out = mhla(*ragged, mixing, c, backend="torch")
    assert rel_err(out, mhla_reference(*ragged, mixing, c)) < 1e-10
    assert not calls
