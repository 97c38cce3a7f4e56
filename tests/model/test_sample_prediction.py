"""`model.prediction="sample"` (x-prediction): the network predicts the clean clip and the
model returns the velocity it implies, so the loss, the sampler and guidance are those of
velocity models. Checked against the rectified-flow path itself, against the same weights
read as a velocity model, in both archs, in bf16, and by training."""

import pytest
import torch

from mhla_dist.config.dit import dit_config
from mhla_dist.model.rectified_flow import (
    SAMPLE_PREDICTION_MIN_T,
    euler_sample,
    interpolate,
    rectified_flow_loss,
    velocity_from_sample,
    velocity_target,
)
from mhla_dist.model.video import build_dit
from tests.model.dit_helpers import batch, perturb
from tests.numerics import rel_err

ARCHS = {"dit": {}, "wan": dict(arch="wan", pos_embed="rope", num_classes=0)}


def test_exact_sample_gives_the_velocity_target():
    """At x_t on the straight path, the true x0 implies exactly the training target."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, 2, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64)
    v = velocity_from_sample(interpolate(x0, noise, t), x0, t)
    assert torch.allclose(v, velocity_target(x0, noise), atol=1e-12)
    # Below the floor the division stops growing: (x_t - x0) / 0.05.
    tiny = torch.tensor([1e-4, 0.0, 0.01], dtype=torch.float64)
    xt = interpolate(x0, noise, tiny)
    expect = (xt - x0) / SAMPLE_PREDICTION_MIN_T
    assert torch.allclose(velocity_from_sample(xt, x0, tiny), expect, atol=1e-12)


def _pair(solo, arch, dtype=torch.float64):
    """(velocity model, sample model) with the same perturbed weights."""
    models = []
    for prediction in ("velocity", "sample"):
        torch.manual_seed(0)
        model = build_dit(dit_config("tiny", prediction=prediction, **ARCHS[arch]),
                          tp_group=solo, cp_group=solo).to(dtype)
        perturb(model)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_network_output_is_the_clean_sample(solo, arch):
    velocity_model, sample_model = _pair(solo, arch)
    clip, _, t, labels = batch(velocity_model.cfg, b=3, dtype=torch.float64)
    t[0] = 0.01  # below the floor
    with torch.no_grad():
        x0_tokens = velocity_model(clip, t, labels)  # what the shared network computes
        out = sample_model(clip, t, labels)
        tokens = sample_model.local_tokens(clip)
    floor = t.clamp_min(SAMPLE_PREDICTION_MIN_T).view(-1, 1, 1)
    assert rel_err(out, (tokens - x0_tokens) / floor) < 1e-12
    # The sampler's whole-clip velocity is the same thing, unpatchified.
    with torch.no_grad():
        v = sample_model.velocity(clip, t, labels)
    assert rel_err(sample_model.patchify(v), out) < 1e-12


def test_bf16(solo):
    """A bf16 model: bf16 velocity, finite gradients, close to the same weights in fp32."""
    _, ref = _pair(solo, "dit", torch.float32)
    _, model = _pair(solo, "dit", torch.float32)
    model = model.to(torch.bfloat16)
    clip, noise, t, labels = batch(model.cfg, b=4)
    clip = clip.clamp(-1, 1)
    out = model(clip, t, labels)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        assert rel_err(out.float(), ref(clip, t, labels)) < 0.03
    total, _ = rectified_flow_loss(model, clip, noise, t, labels)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_trains_and_samples(solo):
    """40 AdamW steps on one fixed batch: the loss falls; the sampler then runs guided."""
    torch.manual_seed(0)
    model = build_dit(dit_config("tiny", prediction="sample", softmax_layers=[1]),
                      tp_group=solo, cp_group=solo)
    clip, noise, t, labels = batch(model.cfg, b=4)
    clip = clip.clamp(-1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        total, count = rectified_flow_loss(model, clip, noise, t, labels)
        opt.zero_grad()
        (total / count).backward()
        opt.step()
        losses.append((total / count).item())
    assert losses[-1] < 0.8 * losses[0], losses
    out = euler_sample(model.eval(), noise, labels, 4, cfg_scale=2.0)
    assert out.shape == clip.shape and torch.isfinite(out).all()


def test_bad_prediction_is_named():
    with pytest.raises(ValueError, match=r"prediction='epsilon' is not one of 'velocity', "
                                         r"'sample'"):
        dit_config("tiny", prediction="epsilon")
