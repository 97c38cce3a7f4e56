"""Consolidated weights -> a model at any DP x CP x TP layout, and the layout check for
resuming a DeepSpeed checkpoint.

Consolidated weights are full tensors, so resharding is each TP rank taking its slice of
every split parameter (`tp_state.load_full_state_dict`); DP and CP ranks hold replicas.
A consolidated file holds no optimizer state. Carrying the optimizer over goes through
DeepSpeed's own `load_checkpoint`, which needs the same TP degree and, with ZeRO >= 1, the
same data-parallel (DP x CP) size (`check_resume_layout` says so before DeepSpeed fails
less clearly), or through a universal checkpoint (`universal.py`) at any layout.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mhla_dist.parallel.tp_state import full_rows, load_full_state_dict, split_dim

from .files import read_consolidated
from .model_spec import ConversionError, ModelConfig, ParamInfo, check_state

log = logging.getLogger("mhla_dist.convert")
# Keys that do not change the weights' meaning: a config may differ in them.
_FREE_KEYS = {"activation_checkpointing", "loss_chunk_tokens", "rope_per_document",
              "mixing_init"}


def full_layout(module: nn.Module, tp: int) -> dict[str, ParamInfo]:
    """Full shapes of a TP-sharded module's parameters (split dims times `tp`, less a
    vocab-parallel parameter's padding); a ZeRO-3 partitioned parameter's shape is its
    `ds_shape`."""
    layout = {}
    for name, p in module.named_parameters():
        dim = split_dim(p)
        shape = list(getattr(p, "ds_shape", p.shape))
        if dim is not None:
            shape[dim] = full_rows(p, tp)
        layout[name] = ParamInfo(tuple(shape), dim)
    return layout


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = asdict(a), asdict(b)
    return [f"{k}: file {db.get(k)!r} vs run {da.get(k)!r}"
            for k in sorted(set(da) | set(db)) if k not in _FREE_KEYS and da.get(k) != db.get(k)]


def load_full_weights(module: nn.Module, state: dict[str, torch.Tensor], tp_group, *,
                      what: str, file_cfg: ModelConfig | None = None,
                      model_cfg: ModelConfig | None = None) -> None:
    """Load full (TP-merged) weights into this rank's `module` (its TP slice of every
    tensor), after checking the source's model config against `model_cfg` and every
    tensor's name and full shape."""
    if model_cfg is not None and file_cfg is not None:
        diff = config_differences(model_cfg, file_cfg)
        if diff:
            raise ConversionError(f"{what} was saved for another model config: "
                                  + "; ".join(diff))
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    check_state(state, full_layout(module, tp), f"the weights in {what}")
    load_full_state_dict(module, state, tp_group)


def load_consolidated_weights(module: nn.Module, path: str | Path, tp_group,
                              model_cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Load the consolidated file `path` into this rank's `module`; returns the full
    state."""
    state, file_cfg = read_consolidated(path)
    load_full_weights(module, state, tp_group, what=str(path), file_cfg=file_cfg,
                      model_cfg=model_cfg)
    return state


_OPTIM = re.compile(r"mp_rank_(\d+)_optim_states\.pt$")


def saved_layout(folder: Path) -> tuple[int, int | None]:
    """(TP degree, DP x CP size) a trainer checkpoint was saved at; the second is None for
    ZeRO stage 0 (no optimizer partitions: any DP x CP size can load it)."""
    models = [p for p in folder.glob("*mp_rank_*_model_states.pt")]
    saved_tp = len({re.search(r"mp_rank_(\d+)_", p.name).group(1) for p in models})
    optim = [p for p in folder.iterdir() if _OPTIM.search(p.name)]
    return saved_tp, (len(optim) // max(saved_tp, 1) if optim else None)


def check_resume_layout(folder: Path, tp: int, dp_cp: int) -> None:
    """Raise a clear error when a checkpoint was saved at another TP degree or (ZeRO >= 1)
    another data-parallel size: its optimizer partitions only fit the layout that wrote
    them."""
    saved_tp, saved_dp = saved_layout(folder)
    if saved_tp != tp or saved_dp is not None and saved_dp != dp_cp:
        raise ConversionError(
            f"{folder} was saved at tp={saved_tp}"
            + (f", dp x cp={saved_dp}" if saved_dp is not None else "")
            + f"; this run has tp={tp}, dp x cp={dp_cp}. To carry the optimizer state over, "
            f"convert it (tools/convert_checkpoint.py to-universal {folder} NEW_FOLDER) and "
            "give NEW_FOLDER instead (resume= or init.weights=); or keep the weights only "
            "with init.optimizer=reset; or run at the saved layout")
