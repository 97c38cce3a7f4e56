"""The public stage functions, alone and composed the way context parallelism uses them."""

import pytest
import torch

from mhla_kernels import block_outputs, block_summaries, mhla, mix_summaries
from tests.kernels.inputs import make_inputs
from tests.numerics import assert_grads_close, rel_err


def test_block_summaries_are_per_block_sums_with_ragged_last_block():
    q, k, v, _ = make_inputs(2, 45, 3, 4, 5, 10)
    s, z = block_summaries(k, v, 10)
    assert s.shape == (2, 5, 3, 4, 5) and z.shape == (2, 5, 3, 4)
    for i in range(5):
        kb, vb = k[:, 10 * i:10 * i + 10], v[:, 10 * i:10 * i + 10]
        assert rel_err(s[:, i], torch.einsum("bnhd,bnhe->bhde", kb, vb)) < 1e-14
        assert rel_err(z[:, i], kb.sum(1)) < 1e-14


def test_block_summaries_accumulate_half_inputs_in_float32():
    _, k, v, _ = make_inputs(1, 64, 1, 4, 4, 64, dtype=torch.bfloat16)
    s, z = block_summaries(k, v, 64)
    assert s.dtype == torch.float32 and z.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True])
def test_mix_rows_subset_equals_rows_of_full_mix(causal):
    _, k, v, mixing = make_inputs(1, 80, 2, 4, 3, 10, per_head=True)
    s, z = block_summaries(k, v, 10)
    t_all, y_all = mix_summaries(s, z, mixing, causal=causal)
    t, y = mix_summaries(s, z, mixing, causal=causal, block_start=3, num_rows=4)
    assert rel_err(t, t_all[:, 3:7]) < 1e-14 and rel_err(y, y_all[:, 3:7]) < 1e-14


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_stages_sharded_like_context_parallelism_equal_mhla(parts, causal, normalize):
    """Each 'rank' summarises its shard, the summaries are concatenated (the all-gather),
    each mixes its own rows and computes its outputs: outputs and gradients equal mhla's."""
    c, n = 16, 256
    q, k, v, mixing = make_inputs(2, n, 2, 8, 4, c, per_head=True, extra_blocks=1)
    inputs = [t.requires_grad_() for t in (q, k, v, mixing)]
    kw = dict(causal=causal, normalize=normalize)
    local_n, local_m = n // parts, n // parts // c
    shards = [slice(r * local_n, (r + 1) * local_n) for r in range(parts)]
    summ = [block_summaries(k[:, sl], v[:, sl], c) for sl in shards]
    s, z = torch.cat([x[0] for x in summ], 1), torch.cat([x[1] for x in summ], 1)
    outs = []
    for r, sl in enumerate(shards):
        t, y = mix_summaries(s, z, mixing, block_start=r * local_m, num_rows=local_m,
                             causal=causal)
        outs.append(block_outputs(q[:, sl], k[:, sl], v[:, sl], t, y, mixing, c,
                                  block_start=r * local_m, **kw))
    out = torch.cat(outs, 1)
    ref = mhla(*inputs, c, **kw)
    assert rel_err(out, ref) < 1e-12
    assert_grads_close(out, ref, inputs, tol=1e-12)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("parts", [1, 3])
def test_intra_terms_first_then_prefix_equal_mhla(monkeypatch, parts, normalize):
    """Causal context parallelism computes the intra-block terms while the summaries are
    in flight, then adds the mixed prefix: outputs and gradients still equal mhla's (also
    over several slabs and with per-head mixing)."""
    from mhla_kernels import block_outputs_intra, torch_function

    monkeypatch.setattr(torch_function, "SLAB_TOKENS", 32)  # 2 blocks a slab
    c, n = 16, 48 * parts
    q, k, v, mixing = make_inputs(2, n, 2, 8, 4, c, per_head=True, extra_blocks=1)
    inputs = [t.requires_grad_() for t in (q, k, v, mixing)]
    local_n, local_m = n // parts, n // parts // c
    shards = [slice(r * local_n, (r + 1) * local_n) for r in range(parts)]
    summ = [block_summaries(k[:, sl], v[:, sl], c) for sl in shards]
    s, z = torch.cat([x[0] for x in summ], 1), torch.cat([x[1] for x in summ], 1)
    outs = []
    for r, sl in enumerate(shards):
        intra = block_outputs_intra(q[:, sl], k[:, sl], v[:, sl], mixing, c,
                                    normalize=normalize, block_start=r * local_m)
        t, y = mix_summaries(s, z, mixing, block_start=r * local_m, num_rows=local_m,
                             causal=True)
        outs.append(block_outputs(q[:, sl], k[:, sl], v[:, sl], t, y, mixing, c, causal=True,
                                  normalize=normalize, block_start=r * local_m, intra=intra))
    out = torch.cat(outs, 1)
    ref = mhla(*inputs, c, causal=True, normalize=normalize)
    assert rel_err(out, ref) < 1e-12
    assert_grads_close(out, ref, inputs, tol=1e-12)


def test_intra_terms_must_match_the_call():
    from mhla_kernels import block_outputs_intra

    q, k, v, mixing = make_inputs(1, 32, 2, 4, 4, 8)
    intra = block_outputs_intra(q, k, v, mixing, 8)
    s, z = block_summaries(k, v, 8)
    t, y = mix_summaries(s, z, mixing, causal=True)
    with pytest.raises(ValueError, match=r"intra was computed for other arguments"):
        block_outputs(q, k, v, t, y, mixing, 8, causal=True, normalize=False, intra=intra)
