"""Procedural moving-shape clips with class labels (which shape), for tests and demos.

Clip `i` of seed `s` is a pure function of `(s, i)`: one coloured shape (class 0 square,
1 disc, 2 triangle, 3 ring) moves at constant velocity, bouncing off the borders, over a
dark, slightly noisy background. uint8 `[F, S, S, 3]`.

With `caption_dim > 0` every clip also gets a caption embedding (`synthetic_caption`): its
class's prototype plus a little per-clip noise, so a caption-conditioned model has
something to learn (the class) and captions of one class are near each other but not equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mhla_dist.data.writing import ShardSink, ShardSummary, clip_sample

SHAPES = ("square", "disc", "triangle", "ring")
CAPTION_NOISE = 0.1  # per-clip noise on a caption, relative to its unit-norm class prototype
# A shape's radius is drawn uniformly from this range, in frame sizes: at 16 pixels these
# are 2-3.5 pixel radii, where a ring is barely a ring; `radius` widens it.
DEFAULT_RADIUS = (0.12, 0.22)


def check_radius(radius) -> tuple[float, float]:
    """`(min, max)` radius as fractions of the frame size, or a ValueError naming it."""
    lo, hi = (float(x) for x in radius)
    if not 0 < lo <= hi < 0.5:
        raise ValueError(f"radius={tuple(radius)} must be (min, max) fractions of the frame "
                         "size with 0 < min <= max < 0.5 (a shape fits inside the frame)")
    return lo, hi


def _mask(shape: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == 0:
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    d2 = dy**2 + dx**2
    if shape == 1:
        return d2 <= r * r
    if shape == 2:  # apex up: inside when below the two slanted edges and above the base
        return (dy <= r) & (dy >= -r + 2 * np.abs(dx))
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def synthetic_clip(index: int, *, frames: int, size: int, seed: int = 0,
                   radius: tuple[float, float] = DEFAULT_RADIUS) -> tuple[np.ndarray, int]:
    """`(clip uint8 [frames, size, size, 3], label)` for clip `index`; the shape's radius
    is drawn from `radius` (fractions of `size`)."""
    lo, hi = check_radius(radius)
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES)))
    r = size * rng.uniform(lo, hi)
    pos = rng.uniform(r, size - r, 2)
    vel = rng.uniform(-1, 1, 2) * size / max(frames, 1) * 0.8
    color = rng.integers(120, 256, 3).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clip = rng.integers(0, 24, (frames, size, size, 3)).astype(np.uint8)
    for f in range(frames):
        clip[f][_mask(label, yy - pos[0], xx - pos[1], r)] = color
        pos = pos + vel
        for a in range(2):  # bounce
            if not r <= pos[a] <= size - r:
                vel[a] = -vel[a]
                pos[a] = np.clip(pos[a], r, size - r)
    return clip, label


def class_prototype(label: int, caption_dim: int, seed: int = 0) -> np.ndarray:
    """The unit-norm Gaussian direction float32 `[caption_dim]` that every caption of class
    `label` (and `seed`) sits near."""
    if caption_dim < 1:
        raise ValueError(f"caption_dim={caption_dim} must be >= 1")
    v = np.random.default_rng([seed, 1_000_003, label]).standard_normal(caption_dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def synthetic_caption(index: int, label: int, caption_dim: int, seed: int = 0) -> np.ndarray:
    """Clip `index`'s caption embedding float32 `[caption_dim]`: its class prototype plus
    `CAPTION_NOISE` x Gaussian noise.

    The noise has its own generator `(seed, index, 7)`, not the clip's `(seed, index)`, so
    adding captions leaves every clip's pixels as they were without them.
    """
    noise = np.random.default_rng([seed, index, 7]).standard_normal(caption_dim)
    return (class_prototype(label, caption_dim, seed) + CAPTION_NOISE * noise).astype(np.float32)


FILLER_WORDS = 8  # class-independent token vectors a synthetic caption is padded out with


def synthetic_text(index: int, label: int, caption_dim: int, max_tokens: int,
                   seed: int = 0) -> np.ndarray:
    """Clip `index`'s caption *tokens* float32 `[L, caption_dim]`, `L` drawn in
    `[ceil(max_tokens / 2), max_tokens]`: filler words (`FILLER_WORDS` class-independent
    directions) and, at a random position, the class's prototype, each with
    `CAPTION_NOISE` noise. A cross-attending model has to find the class word.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    rng = np.random.default_rng([seed, index, 11])
    n = int(rng.integers(-(-max_tokens // 2), max_tokens + 1))
    words = np.stack([class_prototype(1000 + w, caption_dim, seed) for w in range(FILLER_WORDS)])
    tokens = words[rng.integers(0, FILLER_WORDS, n)]
    tokens[rng.integers(0, n)] = class_prototype(label, caption_dim, seed)
    return (tokens + CAPTION_NOISE * rng.standard_normal(tokens.shape)).astype(np.float32)


def synthetic_clips(num_clips: int, *, frames: int, size: int, seed: int = 0,
                    radius: tuple[float, float] = DEFAULT_RADIUS
                    ) -> Iterator[tuple[np.ndarray, int]]:
    for i in range(num_clips):
        yield synthetic_clip(i, frames=frames, size=size, seed=seed, radius=radius)


def write_synthetic_video(output: str | Path, *, num_clips: int, frames: int, size: int,
                          seed: int = 0, clips_per_shard: int = 64, caption_dim: int = 0,
                          caption_seed: int | None = None,
                          text_tokens: int = 0,
                          radius: tuple[float, float] = DEFAULT_RADIUS) -> ShardSummary:
    """Write `num_clips` synthetic clips as clip shards under `output`.

    `caption_dim > 0` adds a caption embedding `emb.npy` to every clip (`synthetic_caption`,
    drawn from `caption_seed`, default `seed`: a different one changes the captions, not
    the clips); with `text_tokens > 0` it is caption tokens `[L, caption_dim]`,
    `L <= text_tokens` (`synthetic_text`), for models that cross-attend (`text_dim`).
    `radius`: the shapes' (min, max) radius as fractions of `size`.
    """
    radius = check_radius(radius)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"text_tokens={text_tokens!r} must be an integer >= 0 (0 = a pooled "
                         "caption)")
    if text_tokens and not caption_dim:
        raise ValueError(f"text_tokens={text_tokens} needs caption_dim > 0 (the tokens' width)")
    if isinstance(caption_dim, bool) or not isinstance(caption_dim, int) or caption_dim < 0:
        raise ValueError(f"caption_dim={caption_dim!r} must be an integer >= 0 (0 = no "
                         f"captions)")
    caption_seed = seed if caption_seed is None else caption_seed
    meta = {"kind": "video", "generator": "synthetic moving shapes", "classes": list(SHAPES),
            "clip_shape": [frames, size, size, 3], "seed": seed, "caption_dim": caption_dim,
            "radius": list(radius)}
    if caption_dim:
        meta["caption_seed"] = caption_seed
        meta["text_tokens"] = text_tokens
    with ShardSink(output, prefix="clips", maxcount=clips_per_shard, meta=meta) as sink:
        for i, (clip, label) in enumerate(synthetic_clips(num_clips, frames=frames, size=size,
                                                          seed=seed, radius=radius)):
            if text_tokens:
                caption = synthetic_text(i, label, caption_dim, text_tokens, caption_seed)
            elif caption_dim:
                caption = synthetic_caption(i, label, caption_dim, caption_seed)
            else:
                caption = None
            sink.write(clip_sample(i, clip, label, caption=caption, shape=SHAPES[label]))
    return sink.summary
