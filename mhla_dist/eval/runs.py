"""A finished training run's language model, loaded in this one process for evaluation
and sampling (any training layout: `model.safetensors` holds the consolidated weights)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SINGLE_PROCESS = ["parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false"]


@contextmanager
def single_process() -> Iterator[None]:
    """megatron-core's groups for a world of one, as long as the models are in use."""
    from mhla_dist.parallel import build_topology, destroy_topology

    build_topology()
    try:
        yield
    finally:
        destroy_topology()


def read_lm_config(run_dir: Path):
    """A run directory's config at a single-process layout; its model must be an LM."""
    from mhla_dist.config import LMConfig, load_config

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir / name} does not exist: RUN_DIR must be a finished "
                             "training run (config.yaml and model.safetensors)")
    cfg = load_config(run_dir / "config.yaml", SINGLE_PROCESS)
    if not isinstance(cfg.model, LMConfig):
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} model, not a language model")
    return cfg


def load_lm(run_dir: Path, cfg) -> torch.nn.Module:
    """The model of `cfg` with the run's `model.safetensors`, on CPU, in eval mode (call
    inside `single_process`)."""
    from safetensors.torch import load_file

    from mhla_dist.model.lm import MHLALanguageModel

    model = MHLALanguageModel(cfg.model)
    path = Path(run_dir) / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        raise ValueError(f"{path} does not fit the model of its config.yaml: {exc}") from None
    return model.eval()


@contextmanager
def loaded_lm(run_dir: Path) -> Iterator[tuple[object, torch.nn.Module]]:
    """`(cfg, model)` of a run directory, valid inside the block."""
    cfg = read_lm_config(run_dir)
    with single_process():
        yield cfg, load_lm(run_dir, cfg)
