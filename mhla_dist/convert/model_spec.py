"""What a consolidated checkpoint must hold: the model config, and each parameter's full
shape and tensor-parallel split dim, read from the model built on the meta device.

The split dims are megatron-core's own attributes (`tensor_model_parallel`,
`partition_dim`): ColumnParallelLinear weights split along dim 0, RowParallelLinear along
dim 1, a per-head `Mc` along dim 0; everything else is replicated. Asking the model
instead of hard-coding names keeps this right when layers change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from mhla_dist.config import ConfigError, DiTConfig, LMConfig, build_config, load_config
from mhla_dist.parallel.tp_state import split_dim

ModelConfig = LMConfig | DiTConfig


class ConversionError(ValueError):
    """An input that cannot be converted: a missing file, a key layout or a shape that
    does not match. Raised before anything is written."""


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    partition_dim: int | None  # the TP split dim, None when replicated


def model_config_from_dict(data: dict) -> ModelConfig:
    """A validated (and, for the LM, resolved) model config from its JSON/YAML mapping."""
    try:
        return build_config(OmegaConf.create({"model": dict(data)})).model
    except ConfigError as exc:
        raise ConversionError(f"invalid model config: {exc}") from None


def model_config_json(cfg: ModelConfig) -> str:
    return json.dumps(asdict(cfg), indent=1)


def read_run_config(path: Path) -> ModelConfig:
    """The model config of a run's `config.yaml` (what every checkpoint folder holds)."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: a checkpoint folder written by the "
                              "trainer holds its config.yaml")
    try:
        return load_config(path).model
    except ConfigError as exc:
        raise ConversionError(f"{path}: {exc}") from None


@contextlib.contextmanager
def single_rank_groups() -> Iterator[object]:
    """A process group of one to build a model outside a distributed run (a world of one
    in this process when torch.distributed is not initialised; torn down afterwards)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("building a model for conversion needs a single process; "
                               f"this one is rank {dist.get_rank()} of {dist.get_world_size()}")
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def build_model(cfg: ModelConfig, *, tp_group, cp_group) -> nn.Module:
    """The LM or the DiT for `cfg` on the given groups."""
    if isinstance(cfg, LMConfig):
        from mhla_dist.model.lm import MHLALanguageModel

        return MHLALanguageModel(cfg, tp_group=tp_group, cp_group=cp_group)
    from mhla_dist.model.video import build_dit

    return build_dit(cfg, tp_group=tp_group, cp_group=cp_group)


def parameter_layout(cfg: ModelConfig) -> dict[str, ParamInfo]:
    """`{name: (full shape, TP split dim)}` of every parameter, in the model's order."""
    with single_rank_groups() as group, torch.device("meta"):
        model = build_model(cfg, tp_group=group, cp_group=group)
    return {name: ParamInfo(tuple(p.shape), split_dim(p)) for name, p in model.named_parameters()}


def check_state(state: dict[str, torch.Tensor], layout: dict[str, ParamInfo],
                what: str = "the weights") -> None:
    """Raise one `ConversionError` naming every missing, unexpected or misshapen tensor."""
    problems = []
    missing = [n for n in layout if n not in state]
    extra = [n for n in state if n not in layout]
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append(f"{len(extra)} unexpected tensors: {', '.join(extra[:8])}"
                        + (" ..." if len(extra) > 8 else ""))
    for name, info in layout.items():
        if name in state and tuple(state[name].shape) != info.shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the model "
                            f"expects {info.shape}")
    if problems:
        raise ConversionError(f"{what} do not match the model config: " + "; ".join(problems))
