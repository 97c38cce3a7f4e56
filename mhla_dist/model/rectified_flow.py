"""Rectified flow: the DiT's training objective and its Euler sampler.

Convention (SD3, Esser et al. 2024): time `t` in [0, 1] runs from data to noise,

    x_t = (1 - t) x0 + t noise,        velocity  v = dx_t/dt = noise - x0,

and the model regresses `v` from `(x_t, t)`. Training draws `t` from a logit-normal
distribution, `t = sigmoid(mean + std * n)`, `n ~ N(0, 1)`, which spends most samples on
intermediate times. Sampling integrates `dx/dt = v` from `t = 1` (noise) to `t = 0`.

Every rank of a data-parallel replica must draw the same `t`, noise and label dropout (its
CP ranks hold slices of one clip, its TP ranks the same tokens): pass a generator seeded
alike on all of them, or draw on one rank and broadcast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossSum(NamedTuple):
    """A sum of squared errors over this rank's elements and how many there were.

    The trainer divides by the global count (all-reduced over DP x CP, DESIGN §2), so
    uneven shards weigh correctly: back-propagate `sum * dp_cp / global_count`, log
    `global sum / global_count`.
    """

    sum: torch.Tensor
    count: int


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *(1,) * (like.dim() - 1))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 - t) x0 + t noise` with one `t` per sample (`[B]`)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity `noise - x0` (constant along the straight path)."""
    return noise - x0


# Under `prediction="sample"` the velocity `(x_t - x0) / t` divides by at least this: near
# t = 0 it would otherwise amplify the network's error without bound (JiT clips alike).
SAMPLE_PREDICTION_MIN_T = 0.05


def velocity_from_sample(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity `(x_t - x0) / max(t, SAMPLE_PREDICTION_MIN_T)` that a predicted clean
    sample `x0` implies at `x_t` (`x_t = (1 - t) x0 + t noise` gives `noise - x0 = (x_t - x0)
    / t`); one `t` per sample (`[B]`), computed in fp32 at least, returned in `x0.dtype`."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    t = _per_sample(t.clamp_min(SAMPLE_PREDICTION_MIN_T), x0).to(dtype)
    return ((x_t.to(dtype) - x0.to(dtype)) / t).to(x0.dtype)


def sample_timesteps(batch: int, *, mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logit-normal times `[batch]` in (0, 1): `sigmoid(mean + std * N(0, 1))`."""
    if std < 0:
        raise ValueError(f"std={std} must be >= 0")
    n = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    return torch.sigmoid(mean + std * n).to(dtype)


def drop_labels(labels: torch.Tensor, prob: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by `null_class` with probability `prob` (classifier-free
    guidance training)."""
    if not 0 <= prob < 1:
        raise ValueError(f"prob={prob} must be in [0, 1)")
    if prob == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def drop_captions(caption: torch.Tensor, prob: float,
                  generator: torch.Generator | None = None,
                  mask: torch.Tensor | None = None):
    """Replace each caption by zeros (the unconditional caption) with probability `prob`
    (classifier-free guidance training): a pooled `[B, D]` caption, or caption tokens
    `[B, L, D]` with their `mask` `[B, L]`; a dropped caption's tokens are all attended
    zeros, which is one zero token. Returns the caption, or `(tokens, mask)` when `mask`
    is given."""
    if not 0 <= prob < 1:
        raise ValueError(f"prob={prob} must be in [0, 1)")
    if prob == 0:
        return caption if mask is None else (caption, mask)
    keep = torch.rand(caption.shape[0], generator=generator) >= prob
    keep = keep.to(caption.device)
    dropped = caption * keep.to(caption.dtype).view(-1, *(1,) * (caption.dim() - 1))
    if mask is None:
        return dropped
    return dropped, mask.to(caption.device) | ~keep[:, None]


def rectified_flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        labels: torch.Tensor | None = None,
                        caption: torch.Tensor | None = None, text: torch.Tensor | None = None,
                        text_mask: torch.Tensor | None = None) -> LossSum:
    """Squared velocity error over this rank's tokens and channels, and its count.

    `model(x_t, t, labels, caption, text, text_mask)` returns this rank's velocity tokens
    and `model.local_tokens(clip)` this rank's slice of a clip's tokens (`DiT` does both).
    `x0`, `noise`: the whole clips `[B, C, F, H, W]`, the same on every rank of a replica.
    """
    if noise.shape != x0.shape or t.shape != x0.shape[:1]:
        raise ValueError(f"x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and t "
                         f"{tuple(t.shape)} must be [B, ...], [B, ...] (the same) and [B]")
    cond = (labels, caption) if text is None else (labels, caption, text, text_mask)
    pred = model(interpolate(x0, noise, t), t, *cond)
    # The error is taken in fp32 at least: a bf16 sum over every element of a clip
    # would round away most of it.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    target = model.local_tokens(velocity_target(x0, noise)).to(dtype)
    return LossSum(((pred.to(dtype) - target) ** 2).sum(), target.numel())


def sampling_times(steps: int, *, shift: float = 1.0, device=None) -> torch.Tensor:
    """`steps + 1` times from 1 to 0, uniform then shifted by `shift t / (1 + (shift-1) t)`
    (shift > 1 spends more steps near noise, as high-resolution and video models do)."""
    if steps < 1 or shift <= 0:
        raise ValueError(f"steps={steps} must be >= 1 and shift={shift} > 0")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, labels: torch.Tensor | None = None,
                 steps: int = 50, *, cfg_scale: float = 1.0,
                 caption: torch.Tensor | None = None, shift: float = 1.0,
                 null_labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate `dx/dt = v` from `noise` (t = 1) to a clip (t = 0) in `steps` Euler steps.

    `model.velocity(x [B, C, F, H, W], t [B], labels, caption, text, text_mask)` returns
    the whole velocity as a clip (`DiT.velocity`). With `cfg_scale != 1`, classifier-free
    guidance: `v = v_u + cfg_scale (v_c - v_u)`, the unconditional pass using
    `null_labels` (default `model.null_class` for every sample) and a zero caption (caption
    tokens: all zeros, all attended).
    """
    uncond_labels = labels
    if cfg_scale != 1.0:
        if labels is None and caption is None and text is None:
            raise ValueError("cfg_scale != 1 needs labels or a caption to guide with")
        if labels is not None:
            uncond_labels = (null_labels if null_labels is not None
                             else torch.full_like(labels, model.null_class))
    text_cond = () if text is None else (text, text_mask)
    if cfg_scale != 1.0 and text is not None:
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        text_cond = (torch.cat([text, torch.zeros_like(text)]),
                     torch.cat([mask if text_mask is None else text_mask.bool(), mask]))
    x = noise
    times = sampling_times(steps, shift=shift, device=noise.device)
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        t = torch.full((x.shape[0],), float(t_cur), device=x.device, dtype=x.dtype)
        if cfg_scale == 1.0:
            v = model.velocity(x, t, labels, caption, *text_cond)
        else:
            both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
            v_c, v_u = model.velocity(
                torch.cat([x, x]), torch.cat([t, t]), both(labels, uncond_labels),
                both(caption, None if caption is None else torch.zeros_like(caption)),
                *text_cond,
            ).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + float(t_next - t_cur) * v
    return x
