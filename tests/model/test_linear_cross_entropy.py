"""The chunked head + cross-entropy equals the plain cross-entropy of the full logits:
the loss sum, the count and the gradients of the hidden states and of the head, for
ragged chunks, ignored targets, fp32, bf16 and float64; and the LM's loss uses it."""

import pytest
import torch
import torch.nn.functional as F

from mhla_dist.model.linear_cross_entropy import linear_cross_entropy
from mhla_dist.model.lm import token_loss

IGNORE = -100


def _inputs(n=37, d=16, v=29, dtype=torch.float64, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (2, n), generator=g)
    t[:, ::ignore_every] = IGNORE
    return h, w, t


def _plain(h, w, t):
    total, count = token_loss(F.linear(h, w), t, IGNORE)
    gh, gw = torch.autograd.grad(total, (h, w))
    return total, count, gh, gw


def _chunked(h, w, t, upstream=1.5, **kw):
    total, count = linear_cross_entropy(h, w, t, ignore_index=IGNORE, **kw)
    gh, gw = torch.autograd.grad(total * upstream, (h, w))  # a non-unit upstream gradient
    return total, count, gh / upstream, gw / upstream


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_equals_plain_cross_entropy_float64(chunk):
    h, w, t = _inputs()
    want, got = _plain(h, w, t), _chunked(h, w, t, chunk_tokens=chunk)
    assert got[1] == want[1] == (t != IGNORE).sum()
    for a, b in zip(got[::2] + got[3:], want[::2] + want[3:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fp32_to_fp32_tolerance():
    h, w, t = _inputs(dtype=torch.float32)
    want, got = _plain(h, w, t), _chunked(h, w, t, chunk_tokens=8)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_is_at_least_as_accurate_as_plain_bf16():
    """Against the float64 loss of the same bf16 values: the fused loss keeps its
    logsumexp in fp32, so its loss and hidden-state gradient are no worse than plain bf16.
    The head's gradient is a sum of per-chunk bf16 matmuls (fp32 sum), one rounding per
    chunk instead of one: a little worse, but within a quarter of plain bf16's error."""
    h, w, t = _inputs(n=200, d=32, v=300, dtype=torch.bfloat16)
    exact = _plain(h.detach().double().requires_grad_(), w.detach().double().requires_grad_(), t)
    plain, fused = _plain(h, w, t), _chunked(h, w, t, upstream=1.0, chunk_tokens=64)
    assert fused[0].dtype == torch.float32
    for i, slack in ((0, 1.01), (2, 1.01), (3, 1.25)):
        err_fused = (fused[i].double() - exact[i]).norm()
        err_plain = (plain[i].double() - exact[i]).norm()
        assert err_fused <= err_plain * slack + 1e-6, (i, err_fused, err_plain)
    torch.testing.assert_close(fused[0].double(), exact[0], rtol=2e-3, atol=0)


def test_every_target_ignored_gives_zero_and_zero_gradients():
    h, w, t = _inputs()
    t[:] = IGNORE
    total, count, gh, gw = _chunked(h, w, t, chunk_tokens=5)
    assert total == 0 and count == 0
    assert not gh.any() and not gw.any()


def test_padding_rows_get_no_probability_and_no_gradient():
    """Rows past `vocab_size` (vocab padded for TP) are out of the logsumexp."""
    h, w, t = _inputs(v=29)
    padded = torch.cat([w.detach(), torch.randn(3, w.shape[1], dtype=w.dtype)]).requires_grad_()
    total, _ = linear_cross_entropy(h, padded, t, ignore_index=IGNORE, vocab_size=29,
                                    chunk_tokens=9)
    gw = torch.autograd.grad(total, padded)[0]
    want = _plain(h, w, t)
    torch.testing.assert_close(total, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw[:29], want[3], rtol=1e-12, atol=1e-12)
    assert not gw[29:].any()


def test_bad_input_is_named():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        linear_cross_entropy(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match="one target per hidden state"):
        linear_cross_entropy(h, w, t[:, :-1])
    with pytest.raises(ValueError, match="vocab_size=40"):
        linear_cross_entropy(h, w, t, vocab_size=40)


def test_lm_loss_equals_the_cross_entropy_of_its_logits():
    from mhla_dist.convert.model_spec import single_rank_groups
    from mhla_dist.model.lm import MHLALanguageModel
    from tests.model.lm_helpers import tiny_lm_config, token_batch

    tokens, targets = token_batch()
    targets = targets.clone()
    targets[0, :10] = IGNORE
    for tie in (True, False):
        with single_rank_groups() as group:
            torch.manual_seed(0)
            model = MHLALanguageModel(tiny_lm_config(tie_embeddings=tie, loss_chunk_tokens=24),
                                      tp_group=group, cp_group=group).double()
            want = token_loss(model(tokens), targets, IGNORE)
            want_grads = torch.autograd.grad(want[0], list(model.parameters()))
            got = model.loss(tokens, targets, IGNORE)
            grads = torch.autograd.grad(got[0], list(model.parameters()))
        assert got[1] == want[1]
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
