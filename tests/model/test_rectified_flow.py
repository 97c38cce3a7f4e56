"""Rectified flow: the path and its velocity, logit-normal times, label dropout, the loss
as (sum, count), and the Euler sampler (with and without classifier-free guidance)."""

import pytest
import torch

from mhla_dist.model.patchify import patchify
from mhla_dist.model.rectified_flow import (
    drop_labels,
    euler_sample,
    interpolate,
    rectified_flow_loss,
    sample_timesteps,
    sampling_times,
    velocity_target,
)

SHAPE, PATCH, GRID = (2, 3, 4, 4, 6), (1, 2, 2), (2, 1, 3)


def _clips(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), \
        torch.randn(SHAPE, generator=g, dtype=torch.float64)


class PointMassFlow:
    """The exact velocity field of a data distribution that is the single clip `x0`:
    `x_t = x0 + t v` gives `v = (x_t - x0) / t`; the model interface of the DiT."""

    null_class = 9

    def __init__(self, x0, offset=0.0):
        self.x0, self.offset, self.calls = x0, offset, 0

    def velocity(self, x, t, labels=None, caption=None):
        self.calls += 1
        return (x - self.x0) / t.view(-1, 1, 1, 1, 1) + self.offset

    def local_tokens(self, clip):
        return patchify(clip, PATCH, GRID)

    def __call__(self, x, t, labels=None, caption=None):
        return self.local_tokens(self.velocity(x, t, labels, caption))


def test_path_and_velocity():
    x0, noise = _clips()
    t = torch.tensor([0.0, 1.0])
    xt = interpolate(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    # d x_t / dt is the velocity target, for every t.
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    step = interpolate(x0, noise, t + 1e-3) - interpolate(x0, noise, t)
    assert torch.allclose(step / 1e-3, velocity_target(x0, noise), atol=1e-9)


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, mean=0.5, std=0.8, generator=g)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    assert torch.allclose(sample_timesteps(3, mean=1.0, std=0.0),
                          torch.sigmoid(torch.tensor(1.0)).expand(3))
    # The same generator seed on every rank of a replica gives the same times.
    assert torch.equal(sample_timesteps(4, generator=torch.Generator().manual_seed(5)),
                       sample_timesteps(4, generator=torch.Generator().manual_seed(5)))


def test_drop_labels():
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    rate = (dropped == 10).double().mean().item()
    assert 0.09 < rate < 0.11, rate
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert drop_labels(labels, 0.0, 10) is labels


def test_loss_is_sum_and_count():
    x0, noise = _clips()
    t = torch.tensor([0.25, 0.7], dtype=torch.float64)
    total, count = rectified_flow_loss(PointMassFlow(x0), x0, noise, t)
    assert count == torch.Size(SHAPE).numel()
    assert total.abs() < 1e-20  # the exact velocity has zero error
    total, count = rectified_flow_loss(PointMassFlow(x0, offset=0.5), x0, noise, t)
    assert torch.allclose(total, torch.tensor(0.25 * count, dtype=torch.float64))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (10, 3.0)])
def test_euler_sample_recovers_x0(steps, shift):
    """Along the straight path the exact velocity is constant, so Euler is exact."""
    x0, noise = _clips(1)
    model = PointMassFlow(x0)
    out = euler_sample(model, noise, None, steps, shift=shift)
    assert torch.allclose(out, x0, atol=1e-12)
    assert model.calls == steps


def test_sampling_times():
    t = sampling_times(4)
    assert torch.allclose(t, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = sampling_times(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > t[1:-1]).all()


class LabelVelocity:
    """v = label (per sample), recording what each call saw."""

    null_class = 0

    def __init__(self):
        self.seen = []

    def velocity(self, x, t, labels=None, caption=None):
        self.seen.append((labels.clone(), None if caption is None else caption.clone()))
        return labels.to(x.dtype).view(-1, 1, 1, 1, 1).expand_as(x)


def test_classifier_free_guidance():
    noise = torch.zeros(2, 1, 1, 2, 2, dtype=torch.float64)
    labels, caption = torch.tensor([3, 5]), torch.ones(2, 4)
    model = LabelVelocity()
    out = euler_sample(model, noise, labels, 1, cfg_scale=2.5, caption=caption)
    # One step from t=1 to 0: x = noise - (v_u + 2.5 (v_c - v_u)), v_u = 0 (null class).
    assert torch.allclose(out, -2.5 * labels.double().view(-1, 1, 1, 1, 1).expand_as(out))
    seen_labels, seen_caption = model.seen[0]
    assert seen_labels.tolist() == [3, 5, 0, 0]
    assert torch.equal(seen_caption, torch.cat([caption, torch.zeros_like(caption)]))
    out = euler_sample(LabelVelocity(), noise, labels, 1, cfg_scale=2.0,
                       null_labels=torch.tensor([1, 1]))
    assert torch.allclose(out[:, 0, 0, 0, 0], -torch.tensor([5.0, 9.0], dtype=torch.float64))


ERRORS = {
    "std": (lambda: sample_timesteps(2, std=-1.0), r"std=-1.0 must be >= 0"),
    "drop": (lambda: drop_labels(torch.zeros(2, dtype=torch.long), 1.0, 3),
             r"prob=1.0 must be in \[0, 1\)"),
    "steps": (lambda: sampling_times(0), r"steps=0 must be >= 1 and shift=1.0 > 0"),
    "cfg": (lambda: euler_sample(LabelVelocity(), torch.zeros(1, 1, 1, 1, 1), None, 2,
                                 cfg_scale=3.0), r"cfg_scale != 1 needs labels or a caption"),
    "loss-shapes": (lambda: rectified_flow_loss(None, torch.zeros(2, 1, 1, 2, 2),
                                                torch.zeros(2, 1, 1, 2, 2), torch.zeros(3)),
                    r"x0 \(2, 1, 1, 2, 2\), noise \(2, 1, 1, 2, 2\) and t \(3,\) must be"),
}


@pytest.mark.parametrize("call,message", ERRORS.values(), ids=ERRORS.keys())
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
