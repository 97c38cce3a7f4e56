"""The Wan-architecture DiT (`arch: wan`) and caption-token cross-attention on one process:
masking, the dropped caption, the MHLA self-attention against the quadratic reference,
the 3-D RoPE against diffusers' own, bf16, sampling with guidance and a falling loss.
(diffusers' WanTransformer3DModel itself: tests/convert/test_import_wan.py; TP and CP:
tests/model/test_dit_parallel.py.)"""

import pytest
import torch

from mhla_dist.config.dit import dit_config
from mhla_dist.model.rectified_flow import euler_sample, rectified_flow_loss
from mhla_dist.model.video import build_dit
from tests.model.dit_helpers import batch, perturb, text_batch
from tests.numerics import rel_err


def build(solo, name="wan-tiny", dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = build_dit(dit_config(name, **overrides), tp_group=solo, cp_group=solo).double()
    perturb(model)
    return model.to(dtype)


@pytest.mark.parametrize("name", ["wan-tiny", "tiny"])
def test_padding_is_masked_and_no_caption_is_one_zero_token(solo, name):
    model = build(solo, name, text_dim=32, text_len=16)
    clip, _, t, labels = batch(model.cfg, dtype=torch.float64)
    text, mask = text_batch(model.cfg, dtype=torch.float64)
    out = model(clip, t, labels, None, text, mask)
    # Row 0's two padded tokens, whatever they hold, change nothing: row 0 alone with its
    # three real tokens gives the same output.
    alone = model(clip[:1], t[:1], None if labels is None else labels[:1], None, text[:1, :3])
    assert rel_err(out[:1], alone) < 1e-12
    garbage = text.clone()
    garbage[0, 3:] = 1e3
    assert rel_err(model(clip, t, labels, None, garbage, mask), out) < 1e-12
    # The caption matters, and a dropped one (None) is zero tokens of any length.
    assert rel_err(model(clip, t, labels, None, text * 2, mask), out) > 1e-3
    zeros = torch.zeros(2, 7, 32, dtype=torch.float64)
    assert rel_err(model(clip, t, labels), model(clip, t, labels, None, zeros)) < 1e-12


def test_mhla_self_attention_is_the_quadratic_reference(solo):
    """An MHLA block's self-attention: the 3-D RoPE before the feature map, then exactly
    the quadratic MHLA reference on those features."""
    from mhla_dist.model.wan_layers import rotate_pairs
    from mhla_kernels import mhla_reference

    model = build(solo)
    attn = model.blocks[0].attn
    x = torch.randn(2, model.cfg.num_tokens, 64, dtype=torch.float64)
    rope = model.rope(x.device)
    q, k, v = attn.project(x)
    q, k = (attn.phi(rotate_pairs(norm(u), *rope)) for norm, u in ((attn.norm_q, q),
                                                                   (attn.norm_k, k)))
    mixing = attn.mixing.clamp(min=0)
    ref = mhla_reference(q, k, v, mixing, model.cfg.block_size, causal=False, normalize=True)
    assert rel_err(attn(x, rope), attn.finish(ref, x)) < 1e-12


def test_rope_is_diffusers_rope_in_block_major_order():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from mhla_dist.model.patchify import patchify
    from mhla_dist.model.wan_layers import rope_tables

    cfg = dit_config("wan-tiny", num_heads=2, hidden_size=48)  # head_dim 24: parts 8, 8, 8
    ref = WanRotaryPosEmbed(cfg.head_dim, tuple(cfg.patch), max_seq_len=64)
    cos_ref, sin_ref = ref(torch.zeros(1, 3, cfg.frames, cfg.height, cfg.width))
    cos, sin = rope_tables(cfg.head_dim, cfg.patch_grid, cfg.block_grid, cfg.rope_theta)
    # diffusers' tables are row-major over the patch grid and repeat each angle twice;
    # ours are block-major, one angle per channel pair.
    grid = cos_ref[0, :, 0, 0::2].T.reshape(1, -1, *cfg.patch_grid)
    order = patchify(grid, (1, 1, 1), cfg.block_grid)[0]
    assert torch.allclose(order, cos.float(), atol=1e-6)
    grid = sin_ref[0, :, 0, 1::2].T.reshape(1, -1, *cfg.patch_grid)
    assert torch.allclose(patchify(grid, (1, 1, 1), cfg.block_grid)[0], sin.float(), atol=1e-6)


def test_bf16_forward_backward_close_to_fp32(solo):
    model64 = build(solo)
    model16 = build(solo, dtype=torch.bfloat16)
    clip, noise, t, _ = batch(model64.cfg)
    text, mask = text_batch(model64.cfg)
    losses, grads = [], []
    for model in (model64, model16):
        total, count = rectified_flow_loss(model, clip.to(model.dtype), noise.to(model.dtype),
                                           t.to(model.dtype), None, None, text, mask)
        (total / count).backward()
        losses.append(float(total / count))
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[1]).all()
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    # bf16 rounds each gradient by ~1e-2; together they point the same way
    assert torch.nn.functional.cosine_similarity(grads[1], grads[0], dim=0) > 0.99


def test_guided_sampling_with_caption_tokens(solo):
    model = build(solo)
    cfg = model.cfg
    noise = torch.randn(2, cfg.in_channels, cfg.frames, cfg.height, cfg.width,
                        dtype=torch.float64)
    text, mask = text_batch(cfg, dtype=torch.float64)
    plain = euler_sample(model, noise, steps=2, text=text, text_mask=mask)
    guided = euler_sample(model, noise, steps=2, text=text, text_mask=mask, cfg_scale=3.0)
    # guidance extrapolates away from the unconditional (zero-caption) velocity
    uncond = euler_sample(model, noise, steps=2)
    assert torch.isfinite(guided).all() and rel_err(guided, plain) > 1e-4
    one_step = euler_sample(model, noise, steps=1, text=text, text_mask=mask, cfg_scale=3.0)
    t = torch.ones(2, dtype=torch.float64)
    v_c, v_u = model.velocity(noise, t, None, None, text, mask), model.velocity(noise, t)
    assert rel_err(one_step, noise - (v_u + 3.0 * (v_c - v_u))) < 1e-12
    assert rel_err(uncond, plain) > 1e-4


def test_caption_errors(solo):
    model = build(solo)
    clip, _, t, _ = batch(model.cfg, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"text of shape \(2, 5\); the model takes caption "
                                         r"tokens \[B, L, text_dim\] = \[2, L, 32\]"):
        model(clip, t, None, None, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"text_mask of shape \(2, 4\) does not fit text"):
        model(clip, t, None, None, torch.zeros(2, 5, 32, dtype=torch.float64),
              torch.ones(2, 4, dtype=torch.bool))
    plain = build(solo, "tiny")
    clip, _, t, labels = batch(plain.cfg, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"text \(caption tokens\) given to a model with "
                                         r"text_dim=0"):
        plain(clip, t, labels, None, torch.zeros(2, 5, 32, dtype=torch.float64))


def test_loss_falls_on_a_tiny_batch(solo):
    """30 AdamW steps on one fixed batch with caption tokens: the loss falls."""
    model = build(solo, dtype=torch.float32)
    clip, noise, t, _ = batch(model.cfg, seed=2)
    text, mask = text_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, count = rectified_flow_loss(model, clip, noise, t, None, None, text, mask)
        opt.zero_grad()
        (total / count).backward()
        opt.step()
        losses.append(float(total / count))
    assert losses[-1] < 0.7 * losses[0], losses
