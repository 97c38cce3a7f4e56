"""Where a run's weights and optimizer state come from, at whatever layout it runs.

The source is the checkpoint to resume (which wins) or `init.weights`:

    kind        what it is                                   optimizer state
    file        a consolidated .safetensors file             none: reset
    checkpoint  a trainer checkpoint folder                  carried at the saved layout
    universal   a folder from convert_checkpoint.py          carried at any layout
                to-universal

`init.optimizer` chooses carry or reset (auto: carry when the source has optimizer state).
Reset loads the full weights into each rank's TP slice before DeepSpeed wraps the model,
which works from any source at any layout. Carry goes through DeepSpeed's
`load_checkpoint` after the engine exists (universal: with `checkpoint.load_universal`).
A resume also restores the step, the data position and the RNG (`checkpoint.py`); a
start from `init.weights` begins at step 0. The choice is logged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mhla_dist.config import Config
from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.model_spec import ConversionError, read_run_config
from mhla_dist.convert.reshard import (
    check_resume_layout,
    config_differences,
    full_layout,
    load_full_weights,
    saved_layout,
)
from mhla_dist.convert.universal import is_universal, read_universal_weights, universal_source
from mhla_dist.convert.zero import consolidate_zero_checkpoint, resolve_checkpoint
from mhla_dist.parallel import Topology
from mhla_dist.parallel.tp_state import pad_rows

log = logging.getLogger("mhla_dist.train")


@dataclass(frozen=True)
class StartPlan:
    source: Path | None
    kind: str  # scratch | file | checkpoint | universal
    carry: bool  # load the optimizer state with the weights
    resume: bool  # also restore the step, data position and RNG


def _resolve(source: Path) -> tuple[Path, str]:
    """The source folder or file and its kind; a run directory or its checkpoints/ folder
    stands for its `latest` checkpoint."""
    if source.is_file() and source.suffix == ".safetensors":
        return source, "file"
    if source.is_dir() and is_universal(source):
        return source, "universal"
    if source.is_dir():
        if any(source.glob("*mp_rank_*_model_states.pt")):
            return source, "checkpoint"
        return resolve_checkpoint(source), "checkpoint"
    raise ConversionError(
        f"{source} is neither a .safetensors file nor a checkpoint folder (one with "
        "DeepSpeed's *mp_rank_XX_model_states.pt, a run directory, or a universal checkpoint)")


def plan_start(cfg: Config, resume: Path | None, topo: Topology) -> StartPlan:
    """What to load, checked against this run before anything is built on it."""
    if resume is None and not cfg.init.weights:
        return StartPlan(None, "scratch", False, False)
    if resume is not None and cfg.init.weights:
        log.info("init.weights=%s ignored: resuming from %s", cfg.init.weights, resume)
    source = resume if resume is not None else Path(cfg.init.weights)
    if not source.exists():
        raise ConversionError(f"init.weights={str(source)!r} does not exist")
    source, kind = _resolve(source)
    choice = cfg.init.optimizer
    if choice == "carry" and kind == "file":
        raise ConversionError(f"init.optimizer=carry: {source} holds no optimizer state")
    carry = kind != "file" if choice == "auto" else choice == "carry"
    if kind != "file":
        diff = config_differences(cfg.model, read_run_config(source / "config.yaml"))
        if diff:
            raise ConversionError(f"{source} was saved for another model config: "
                                  + "; ".join(diff))
    if carry and kind == "checkpoint":
        check_resume_layout(source, topo.tp, topo.dp_cp_size)
    if carry and kind == "universal" and cfg.zero.stage == 0:
        raise ConversionError(f"{source} is a universal checkpoint: DeepSpeed loads those "
                              "with ZeRO stage 1, 2 or 3; set zero.stage, or "
                              "init.optimizer=reset")
    return StartPlan(source, kind, carry, resume is not None)


def deepspeed_checkpoint_config(plan: StartPlan) -> dict:
    """The `checkpoint` section of DeepSpeed's config for this start."""
    return {"load_universal": plan.carry and plan.kind == "universal"}


def load_weights(plan: StartPlan, model: torch.nn.Module, cfg: Config,
                 topo: Topology) -> dict[str, torch.Tensor] | None:
    """Reset: this rank's slice of the source's full weights, before DeepSpeed wraps the
    model (a carried start loads them with the optimizer, after). Returns the full fp32
    weights loaded, which also become the engine's masters once it exists
    (`master_weights.set_master_weights`): a bf16 engine would otherwise make its masters
    from the bf16-rounded parameters."""
    if plan.kind == "scratch" or plan.carry:
        return None
    file_cfg = None
    if plan.kind == "file":
        state, file_cfg = read_consolidated(plan.source)
    elif plan.kind == "universal":
        state = read_universal_weights(plan.source)
    else:  # every rank merges the checkpoint's shards itself (reading only)
        state, _ = consolidate_zero_checkpoint(plan.source,
                                               layout=full_layout(model, topo.tp))
    load_full_weights(model, state, topo.tp_group, what=str(plan.source), file_cfg=file_cfg,
                      model_cfg=cfg.model)
    return {k: v.float() for k, v in state.items()}


def _padded_vocab_partition(resolve):
    """DeepSpeed's AutoTP slicing of a full universal tensor, which knows no vocabulary
    padding: a vocab-parallel parameter (`padded_rows_of`) gets its padding rows back
    (zeros) before the split, as DeepSpeed's ZeRO-1/2 loader does for its vocab tensors."""

    def slice_for_rank(param, ckpt_dict, full, tp_rank, tp_size, *args, **kwargs):
        rows = getattr(param, "padded_rows_of", None)
        if rows is None:
            return resolve(param, ckpt_dict, full, tp_rank, tp_size, *args, **kwargs)
        return pad_rows(full.view(rows, -1), tp_size).chunk(tp_size)[tp_rank].flatten()

    return slice_for_rank


@contextlib.contextmanager
def _zero3_tp_slicing(module: torch.nn.Module, cfg: Config, topo: Topology):
    """DeepSpeed's ZeRO-3 takes each TP rank's slice of a universal checkpoint's tensors
    only for parameters that describe their split (its AutoTP metadata) and through its
    own TP group (`deepspeed.utils.groups`), which a megatron-core model does not set.
    Give it both for the load, then take them away again."""
    if cfg.zero.stage != 3 or topo.tp == 1:
        yield
        return
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.utils import groups

    layout = full_layout(module, topo.tp)
    for name, p in module.named_parameters():
        info = layout[name]
        setattr(p, DS_AUTOTP_UC_META, {"partition_dim": info.partition_dim,
                                       "logical_shape": info.shape,
                                       "replicated": info.partition_dim is None})
    from deepspeed.checkpoint import universal_checkpoint as uc

    saved, resolve = groups._TENSOR_MODEL_PARALLEL_GROUP, uc._resolve_autotp_partition
    groups._TENSOR_MODEL_PARALLEL_GROUP = topo.tp_group
    uc._resolve_autotp_partition = _padded_vocab_partition(resolve)
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP, uc._resolve_autotp_partition = saved, resolve
        for p in module.parameters():
            delattr(p, DS_AUTOTP_UC_META)


def load_carried(plan: StartPlan, engine, cfg: Config, topo: Topology) -> None:
    """Carry: weights and optimizer state through DeepSpeed's own loader."""
    if not plan.carry:
        return
    slicing = (_zero3_tp_slicing(engine.module, cfg, topo) if plan.kind == "universal"
               else contextlib.nullcontext())
    with slicing:
        loaded, _ = engine.load_checkpoint(str(plan.source.parent), tag=plan.source.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {plan.source}")
    _unshare_steps(engine.optimizer)


def _unshare_steps(optimizer) -> None:
    """ZeRO-3's universal load gives every parameter group's Adam state one and the same
    `step` tensor, which torch's Adam increments in place: with two groups the step would
    advance twice per step. Give each state its own."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def describe(plan: StartPlan, topo: Topology) -> str:
    """One line for the log: where the weights came from and what the optimizer got."""
    here = f"tp={topo.tp} cp={topo.cp} dp={topo.dp}"
    if plan.kind == "scratch":
        return f"random init at {here}"
    if plan.kind == "universal":
        src = universal_source(plan.source)
        saved = f"saved at tp={src['tp']}, dp x cp={src['dp_cp']}"
    elif plan.kind == "checkpoint":
        tp, dp_cp = saved_layout(plan.source)
        saved = f"saved at tp={tp}" + (f", dp x cp={dp_cp}" if dp_cp is not None else "")
    else:
        saved = "consolidated"
    how = "resumed from" if plan.resume else "weights from"
    opt = ("optimizer state carried over" if plan.carry else "optimizer state reset")
    return f"{how} {plan.source} ({plan.kind}, {saved}) at {here}; {opt}"
