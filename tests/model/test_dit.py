"""The DiT in one process (a gloo group of one): shapes, adaLN-Zero identity, parameter
counts against the analytic ones, activation checkpointing, conditioning errors, and a
loss that falls in 30 CPU steps on a tiny synthetic batch."""

import pytest
import torch

from mhla_dist.config.dit import DIT_PRESET_PARAMS, DIT_PRESETS, dit_config
from mhla_dist.model.dit import DiT
from mhla_dist.model.dit_cost import dit_num_parameters
from mhla_dist.model.rectified_flow import rectified_flow_loss
from mhla_dist.model.video import build_dit
from mhla_kernels import block_grid_mixing
from tests.model.dit_helpers import batch, perturb
from tests.numerics import rel_err


def build(solo, seed=0, **overrides):
    torch.manual_seed(seed)
    return DiT(dit_config("tiny", **overrides), tp_group=solo, cp_group=solo)


@pytest.mark.parametrize("overrides", [
    {}, dict(softmax_layers=[0], caption_dim=8, pos_embed="learned"),
    dict(frames=1, height=8, width=12, block_grid=[1, 2, 3], patch=[1, 2, 2]),
], ids=["tiny", "hybrid-caption", "image"])
def test_shapes(solo, overrides):
    model = build(solo, **overrides)
    cfg = model.cfg
    clip, noise, t, labels = batch(cfg)
    caption = torch.randn(2, cfg.caption_dim) if cfg.caption_dim else None
    out = model(clip, t, labels, caption)
    assert out.shape == (2, cfg.num_tokens, cfg.patch_dim)
    assert model.velocity(clip, t, labels, caption).shape == clip.shape
    assert model.local_tokens(clip).shape == out.shape
    assert torch.equal(model.unpatchify(model.patchify(clip)), clip)


def test_fresh_model_is_adaln_zero(solo):
    """Zero-initialised modulation: every block is the identity, the output is zero."""
    model = build(solo, softmax_layers=[1])
    cfg = model.cfg
    clip, _, t, labels = batch(cfg)
    x = torch.randn(2, cfg.num_tokens, cfg.hidden_size)
    c = model.condition(t, labels)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(model(clip, t, labels), torch.zeros(2, cfg.num_tokens, cfg.patch_dim))
    for block in model.blocks:  # the distance-initialised 3-D Mc
        if not block.softmax:
            assert torch.equal(block.attn.mixing, block_grid_mixing((2, 2, 2), "linear"))


@pytest.mark.parametrize("overrides", [
    {}, dict(softmax_layers=[1], caption_dim=12, pos_embed="learned"),
    dict(per_head_mixing=True, bias=False, num_classes=0, mlp_ratio=2.5),
], ids=["tiny", "hybrid-caption-learned", "perhead-nobias-uncond"])
def test_parameter_count_matches_analytic(solo, overrides):
    model = build(solo, **overrides)
    assert model.num_parameters() == dit_num_parameters(model.cfg)


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_preset_built_on_meta(solo, name):
    """The presets built on the meta device: the real count is the analytic one, within 5%
    of the name."""
    with torch.device("meta"):
        model = build_dit(dit_config(name), tp_group=solo, cp_group=solo)
    count = model.num_parameters()
    assert count == dit_num_parameters(model.cfg)
    if name in DIT_PRESET_PARAMS:
        assert abs(count / DIT_PRESET_PARAMS[name] - 1) < 0.05, count


def test_activation_checkpointing_same_grads(solo):
    grads, losses = [], []
    for ckpt in (False, True):
        model = build(solo, softmax_layers=[1], activation_checkpointing=ckpt).double()
        perturb(model)
        clip, noise, t, labels = batch(model.cfg, dtype=torch.float64)
        total, count = rectified_flow_loss(model, clip, noise, t, labels)
        (total / count).backward()
        losses.append(total.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g, floor=1e-12) < 1e-10, name


def test_conditioning_errors(solo):
    model = build(solo)
    clip, _, t, labels = batch(model.cfg)
    with pytest.raises(ValueError, match=r"num_classes=10: the model needs labels"):
        model(clip, t)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model(clip, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"caption given to a model with caption_dim=0"):
        model(clip, t, labels, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"clip of shape \(2, 4, 8, 16, 8\); the model "
                                         r"expects \[B, 4, 8, 16, 16\]"):
        model(clip[..., :8], t, labels)
    uncond = build(solo, num_classes=0)
    with pytest.raises(ValueError, match=r"labels given to a model with num_classes=0"):
        uncond(clip, t, labels)


def test_needs_process_groups():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        pytest.skip("megatron-core's groups exist in this process")
    with pytest.raises(RuntimeError, match=r"pass tp_group=/cp_group= or build the topology"):
        DiT(dit_config("tiny"), tp_group=None, cp_group=None)


def test_loss_falls_on_a_tiny_batch(solo):
    """30 AdamW steps on one fixed synthetic batch (clip, noise, t): the loss falls."""
    model = build(solo, softmax_layers=[1])
    clip, noise, t, labels = batch(model.cfg)
    clip = clip.clamp(-1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, count = rectified_flow_loss(model, clip, noise, t, labels)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
