"""Training: the DeepSpeed trainer, schedules, metrics, checkpoints.

    python -m mhla_dist.train --config CONFIG.yaml [key=value ...]   # alone, torchrun, deepspeed
"""

from .checkpoint import find_resume, tag_for
from .schedule import learning_rate
from .trainer import NonFiniteLossError, Trainer, deepspeed_config

__all__ = ["NonFiniteLossError", "Trainer", "deepspeed_config", "find_resume", "learning_rate",
           "tag_for"]
