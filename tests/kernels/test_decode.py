"""The recurrent decode form equals the parallel causal form, token by token."""

import pytest
import torch

from mhla_kernels import MHLADecodeState, mhla, mhla_decode_step
from tests.kernels.inputs import make_inputs
from tests.numerics import rel_err


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "perhead"])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_decode_from_empty_equals_parallel(block_size, per_head, normalize):
    n = 37
    q, k, v, mixing = make_inputs(2, n, 3, 4, 6, block_size, per_head=per_head, extra_blocks=1)
    full = mhla(q, k, v, mixing, block_size, causal=True, normalize=normalize)
    state = MHLADecodeState.empty(2, 3, 4, 6, block_size, mixing.shape[-1], dtype=q.dtype)
    for t in range(n):
        o_t = mhla_decode_step(state, q[:, t], k[:, t], v[:, t], mixing, normalize=normalize)
        assert rel_err(o_t, full[:, t]) < 1e-12, f"token {t}"
    assert state.position == n


@pytest.mark.parametrize("prompt", [1, 15, 16, 17, 32])
def test_decode_after_prefill_equals_parallel(prompt):
    c, n = 16, 50
    q, k, v, mixing = make_inputs(1, n, 2, 4, 4, c, per_head=True)
    full = mhla(q, k, v, mixing, c, causal=True)
    state = MHLADecodeState.from_prefill(k[:, :prompt], v[:, :prompt], mixing, c)
    for t in range(prompt, n):
        o_t = mhla_decode_step(state, q[:, t], k[:, t], v[:, t], mixing)
        assert rel_err(o_t, full[:, t]) < 1e-12, f"token {t}"


def test_decode_half_inputs_keep_float32_state():
    q, k, v, mixing = make_inputs(1, 20, 2, 4, 4, 8, dtype=torch.bfloat16)
    state = MHLADecodeState.from_prefill(k[:, :10], v[:, :10], mixing.float(), 8)
    assert state.current_kv.dtype == torch.float32
    o = mhla_decode_step(state, q[:, 10], k[:, 10], v[:, 10], mixing.float())
    assert o.dtype == torch.bfloat16


def test_decode_past_the_mixing_matrix_raises():
    q, k, v, mixing = make_inputs(1, 8, 1, 2, 2, 4)  # 2 blocks of 4 tokens
    state = MHLADecodeState.from_prefill(k, v, mixing, 4)
    with pytest.raises(ValueError, match=r"token 8 falls in block 2, beyond the 2 blocks"):
        mhla_decode_step(state, q[:, 0], k[:, 0], v[:, 0], mixing)


def test_decode_step_shape_mismatch_raises():
    q, k, v, mixing = make_inputs(1, 8, 2, 4, 4, 4)
    state = MHLADecodeState.empty(1, 2, 4, 4, 4, 2, dtype=q.dtype)
    with pytest.raises(ValueError, match=r"decode step takes q, k \[B, H, d\]"):
        mhla_decode_step(state, q[:, 0, :1], k[:, 0], v[:, 0], mixing)
