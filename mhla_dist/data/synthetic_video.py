"""Procedural moving-shape clips with class labels (which shape), for tests and demos.

Clip `i` of seed `s` is a pure function of `(s, i)`: one coloured shape (class 0 square,
1 disc, 2 triangle, 3 ring) moves at constant velocity, bouncing off the borders, over a
dark, slightly noisy background. uint8 `[F, S, S, 3]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mhla_dist.data.writing import ShardSink, ShardSummary, clip_sample

SHAPES = ("square", "disc", "triangle", "ring")


def _mask(shape: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == 0:
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    d2 = dy**2 + dx**2
    if shape == 1:
        return d2 <= r * r
    if shape == 2:  # apex up: inside when below the two slanted edges and above the base
        return (dy <= r) & (dy >= -r + 2 * np.abs(dx))
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def synthetic_clip(index: int, *, frames: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """`(clip uint8 [frames, size, size, 3], label)` for clip `index`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES)))
    r = size * rng.uniform(0.12, 0.22)
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


def synthetic_clips(num_clips: int, *, frames: int, size: int, seed: int = 0
                    ) -> Iterator[tuple[np.ndarray, int]]:
    for i in range(num_clips):
        yield synthetic_clip(i, frames=frames, size=size, seed=seed)


def write_synthetic_video(output: str | Path, *, num_clips: int, frames: int, size: int,
                          seed: int = 0, clips_per_shard: int = 64) -> ShardSummary:
    """Write `num_clips` synthetic clips as clip shards under `output`."""
    meta = {"kind": "video", "generator": "synthetic moving shapes", "classes": list(SHAPES),
            "clip_shape": [frames, size, size, 3], "seed": seed}
    with ShardSink(output, prefix="clips", maxcount=clips_per_shard, meta=meta) as sink:
        for i, (clip, label) in enumerate(synthetic_clips(num_clips, frames=frames, size=size,
                                                          seed=seed)):
            sink.write(clip_sample(i, clip, label, shape=SHAPES[label]))
    return sink.summary
