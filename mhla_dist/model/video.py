"""`build_dit`: the video transformer a `DiTConfig` asks for (`arch`)."""

from __future__ import annotations

from mhla_dist.config.dit import DiTConfig

from .video_base import VideoTransformer


def build_dit(cfg: DiTConfig, *, tp_group=None, cp_group=None,
              sequence_parallel: bool = False) -> VideoTransformer:
    """`DiT` (arch "dit") or `WanDiT` (arch "wan") on the given groups (default
    megatron-core's)."""
    if cfg.arch == "wan":
        from .wan import WanDiT

        return WanDiT(cfg, tp_group=tp_group, cp_group=cp_group,
                      sequence_parallel=sequence_parallel)
    from .dit import DiT

    return DiT(cfg, tp_group=tp_group, cp_group=cp_group, sequence_parallel=sequence_parallel)
