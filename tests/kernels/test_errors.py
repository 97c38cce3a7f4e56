"""Every argument error of the operator is raised with a message naming the value."""

import pytest
import torch

from mhla_kernels import block_outputs, check_values, mhla, mix_summaries
from tests.kernels.inputs import make_inputs


@pytest.fixture
def inputs():
    return make_inputs(1, 40, 2, 4, 3, 8, dtype=torch.float32)  # 5 blocks


def test_q_k_shapes_disagree(inputs):
    q, k, v, mc = inputs
    with pytest.raises(ValueError, match=r"q \(1, 40, 2, 4\) and k \(1, 40, 2, 5\) must have"):
        mhla(q, torch.rand(1, 40, 2, 5), v, mc, 8)


def test_v_shape_disagrees(inputs):
    q, k, v, mc = inputs
    with pytest.raises(ValueError, match=r"v \(1, 39, 2, 3\) must match q \(1, 40, 2, 4\)"):
        mhla(q, k, v[:, :39], mc, 8)


def test_wrong_number_of_dims(inputs):
    q, k, v, mc = inputs
    with pytest.raises(ValueError, match=r"q has shape \(40, 2, 4\); expected 4 dims"):
        mhla(q[0], k[0], v[0], mc, 8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_block_size_below_one_or_not_int(inputs, bad):
    with pytest.raises(ValueError, match=rf"block_size={bad!r} must be an integer >= 1"):
        mhla(*inputs, bad)


def test_mixing_smaller_than_blocks(inputs):
    q, k, v, mc = inputs
    with pytest.raises(ValueError, match=r"mixing is 4x4 but the sequence has 5 blocks"):
        mhla(q, k, v, mc[:4, :4], 8)


@pytest.mark.parametrize("shape", [(5,), (2, 2, 5, 5), (5, 4)])
def test_mixing_wrong_rank_or_not_square(inputs, shape):
    q, k, v, _ = inputs
    with pytest.raises(ValueError, match=r"mixing has shape"):
        mhla(q, k, v, torch.rand(shape), 8)


def test_per_head_mixing_with_wrong_head_count(inputs):
    q, k, v, _ = inputs
    with pytest.raises(ValueError, match=r"per-head mixing has 3 heads .* but q has H=2"):
        mhla(q, k, v, torch.rand(3, 5, 5), 8)


@pytest.mark.parametrize("name", ["q", "k", "v", "mixing"])
def test_non_floating_inputs(inputs, name):
    args = dict(zip(["q", "k", "v", "mixing"], inputs, strict=True))
    args[name] = args[name].to(torch.int64)
    with pytest.raises(TypeError, match=rf"{name} has dtype torch.int64; MHLA needs a floating"):
        mhla(args["q"], args["k"], args["v"], args["mixing"], 8)


def test_unknown_backend(inputs):
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of 'auto', 'torch'"):
        mhla(*inputs, 8, backend="cuda")


def test_negative_q_with_normalize_caught_by_opt_in_check(inputs):
    q, k, v, mc = inputs
    q = q - 0.5
    mhla(q, k, v, mc, 8)  # the hot path does not read the data
    with pytest.raises(ValueError, match=r"q has a negative entry \(-0.\d+\) with normalize=True"):
        mhla(q, k, v, mc, 8, check_inputs=True)
    mhla(q, k, v, mc, 8, normalize=False, check_inputs=True)  # fine without the denominator
    with pytest.raises(ValueError, match=r"k holds non-finite values"):
        check_values(q.abs(), k.clone().fill_(float("nan")), normalize=False)


def test_stage_errors(inputs):
    q, k, v, mc = inputs
    s = torch.zeros(1, 5, 2, 4, 3)
    with pytest.raises(ValueError, match=r"expected S \[B, M, H, d, dv\] and z \[B, M, H, d\]"):
        mix_summaries(s, torch.zeros(1, 5, 2, 3), mc)
    with pytest.raises(ValueError, match=r"rows \[4, 6\) are not within the 5 blocks"):
        mix_summaries(s, torch.zeros(1, 5, 2, 4), mc, block_start=4, num_rows=2)
    with pytest.raises(ValueError, match=r"the 5 local blocks need T \(1, 5, 2, 4, 3\)"):
        block_outputs(q, k, v, s[:, :4], torch.zeros(1, 4, 2, 4), mc, 8)


def test_triton_backend_without_cuda_or_interpreter(inputs, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .* q is on cpu"):
        mhla(*inputs, 8, backend="triton")
