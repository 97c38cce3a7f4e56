"""`mhla` (torch backend) against the quadratic `mhla_reference`: outputs and every gradient."""

import pytest
import torch

from mhla_kernels import mhla, mhla_reference
from tests.kernels.inputs import make_inputs
from tests.numerics import assert_grads_close, rel_err

# (B, N, H, d, dv, block_size, per_head): awkward N, ragged last blocks, dv != d,
# one token, one block, blocks larger than a sub-chunk (causal splits them in 64s).
SHAPES = [
    (2, 63, 3, 8, 5, 16, False),
    (1, 1, 2, 4, 4, 8, True),
    (1, 500, 2, 8, 8, 200, True),
    (1, 1000, 2, 6, 10, 300, False),
    (2, 130, 2, 4, 4, 7, True),
    (1, 256, 1, 16, 16, 256, False),
    (1, 384, 2, 8, 4, 192, True),
]
IDS = [
    f"B{b}-N{n}-H{h}-d{d}-dv{dv}-C{c}-{'perhead' if p else 'shared'}"
    for b, n, h, d, dv, c, p in SHAPES
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_mhla_matches_reference_float64(shape, causal, normalize):
    b, n, h, d, dv, c, per_head = shape
    made = make_inputs(b, n, h, d, dv, c, per_head=per_head, extra_blocks=2)
    inputs = [t.requires_grad_() for t in made]
    kw = dict(causal=causal, normalize=normalize)
    out = mhla(*inputs, c, **kw, backend="torch")
    ref = mhla_reference(*inputs, c, **kw)
    assert out.shape == (b, n, h, dv) and out.dtype == torch.float64
    err = rel_err(out, ref)
    assert err < 1e-10, f"output rel err {err:.2e}"
    assert_grads_close(out, ref, inputs, tol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mhla_half_inputs_accumulate_in_float32(dtype, causal):
    """Half inputs: output in v's dtype, within 1e-2 of the float64 reference of the same
    (rounded) inputs -- the error of rounding the output once (bf16 has 8 mantissa bits),
    not of accumulating in half precision over 1000 tokens."""
    q, k, v, mixing = make_inputs(2, 1000, 2, 16, 16, 128, per_head=True)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = mhla(q, k, v, mixing.float(), 128, causal=causal)
    assert out.dtype == dtype
    ref = mhla_reference(q.double(), k.double(), v.double(), mixing, 128, causal=causal)
    err = rel_err(out, ref)
    assert err < 1e-2, f"{dtype} rel err {err:.2e}"


def test_mhla_output_dtype_follows_v_and_is_contiguous():
    q, k, v, mixing = make_inputs(1, 40, 2, 4, 4, 8, dtype=torch.float32)
    out = mhla(q, k, v, mixing, 8)
    assert out.dtype == torch.float32 and out.is_contiguous()


def test_mhla_mixing_larger_than_needed_uses_leading_corner():
    q, k, v, mixing = make_inputs(1, 50, 2, 4, 4, 10, extra_blocks=3)
    m = 5
    for causal in (False, True):
        big = mhla(q, k, v, mixing, 10, causal=causal)
        corner = mhla(q, k, v, mixing[:m, :m].clone(), 10, causal=causal)
        assert torch.equal(big, corner)


def test_mhla_explicit_scale_for_unnormalised():
    q, k, v, mixing = make_inputs(1, 33, 2, 4, 4, 8)
    base = mhla(q, k, v, mixing, 8, normalize=False, scale=1.0)
    default = mhla(q, k, v, mixing, 8, normalize=False)
    assert rel_err(default, base * 4**-0.5) < 1e-14
    assert rel_err(base, mhla_reference(q, k, v, mixing, 8, normalize=False, scale=1.0)) < 1e-12


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_mhla_over_many_slabs_matches_reference(monkeypatch, shape, causal):
    """The forward runs, and the backward recomputes, over slabs of whole blocks: with
    tiny slabs every sequence spans several (and a block larger than a slab is its own)."""
    from mhla_kernels import torch_function

    monkeypatch.setattr(torch_function, "SLAB_TOKENS", 32)
    b, n, h, d, dv, c, per_head = shape
    assert len(torch_function.slab_ranges(-(-n // c), c)) > 1
    inputs = [t.requires_grad_() for t in make_inputs(b, n, h, d, dv, c, per_head=per_head)]
    out = mhla(*inputs, c, causal=causal)
    ref = mhla_reference(*inputs, c, causal=causal)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, inputs, tol=1e-10)


def test_mhla_gradient_of_only_some_inputs():
    q, k, v, mixing = make_inputs(1, 70, 2, 4, 4, 16)
    q.requires_grad_()
    out = mhla(q, k, v, mixing, 16, causal=True)
    ref = mhla_reference(q, k, v, mixing, 16, causal=True)
    assert_grads_close(out, ref, [q], names=["q"], tol=1e-10)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("n,c,per_head", [(1000, 512, True), (700, 384, False), (300, 300, True)])
def test_mhla_blocks_larger_than_a_slab_match_reference(monkeypatch, n, c, per_head, causal,
                                                       normalize):
    """A block larger than a slab is split into virtual blocks (Mc kron ones): 512 -> 4 x
    128, 384 -> 3 x 128, 300 -> 3 x 100 (ragged last blocks included); outputs and every
    gradient, the mixing one summed back over the copies, still equal the reference."""
    from mhla_kernels import torch_function

    monkeypatch.setattr(torch_function, "SLAB_TOKENS", 128)
    virtual = torch_function.virtual_block_size(c)
    assert virtual < c and c % virtual == 0
    inputs = [t.requires_grad_() for t in make_inputs(1, n, 2, 4, 3, c, per_head=per_head,
                                                       extra_blocks=1)]
    kw = dict(causal=causal, normalize=normalize)
    out = mhla(*inputs, c, **kw)
    ref = mhla_reference(*inputs, c, **kw)
    assert rel_err(out, ref) < 1e-10
    assert_grads_close(out, ref, inputs, tol=1e-10)


def test_virtual_block_size():
    from mhla_kernels.torch_function import SLAB_TOKENS, virtual_block_size

    assert virtual_block_size(256) == 256
    assert virtual_block_size(4 * SLAB_TOKENS) == SLAB_TOKENS
    assert virtual_block_size(3 * 4096) == 6144
    assert virtual_block_size(8209) == 8209  # a prime: no divisor fits, kept whole
    assert virtual_block_size(2 * 8209) == 2 * 8209  # divisors 2 and 8209: none fits
