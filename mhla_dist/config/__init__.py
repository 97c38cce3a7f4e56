"""Structured configs (omegaconf): model, parallel layout, data, optimiser, ZeRO, schedule,
logging, checkpointing; YAML + `key=value` loading, validated once."""

from .dit import DIT_PRESETS, DiTConfig, dit_config
from .loading import build_config, config_to_yaml, load_config, save_config
from .schema import (
    MODEL_CONFIGS,
    CheckpointConfig,
    Config,
    DataConfig,
    LMConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
    ZeroConfig,
)
from .validation import ConfigError, resolve_lm, validate

__all__ = [
    "DIT_PRESETS",
    "DiTConfig",
    "dit_config",
    "MODEL_CONFIGS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LMConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "WandbConfig",
    "ZeroConfig",
    "build_config",
    "config_to_yaml",
    "load_config",
    "resolve_lm",
    "save_config",
    "validate",
]
