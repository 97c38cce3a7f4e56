"""DeepSpeed universal checkpoints: the optimizer state carried to another layout.

A trainer checkpoint holds ZeRO's flat optimizer partitions, which only fit the DP x CP x
TP layout that wrote them. DeepSpeed's own `ds_to_universal` rewrites them per parameter,

    UNIVERSAL/
        zero/<param name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt   full tensors
        zero/optimizer_state.pt        the param groups (lr, betas, ...)
        *mp_rank_XX_model_states.pt    copied from the source (metadata)
        trainer_state/, config.yaml    copied from the source (ours)
        universal.json                 what it was converted from (ours; marks the folder)

and DeepSpeed's engine loads that at any layout (`checkpoint.load_universal`), each rank
taking its TP slice and its ZeRO fragment. To merge and re-split the TP shards DeepSpeed
needs each parameter's split dim; `universal_checkpoint_info` gives it from megatron-core's
attributes, and the trainer attaches it to the module so that every checkpoint carries it.
ZeRO stage 0 keeps no ZeRO partitions: such a checkpoint resumes directly at any DP x CP
size with the same TP degree and cannot be converted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from math import prod
from pathlib import Path

import torch
from torch import nn

from mhla_dist.parallel.tp_state import split_dim

from .model_spec import (
    ConversionError,
    ModelConfig,
    ParamInfo,
    check_state,
    parameter_layout,
    read_run_config,
)
from .zero import resolve_checkpoint, tp_model_files

log = logging.getLogger("mhla_dist.convert")
MARKER = "universal.json"
_OPTIM = re.compile(r"_optim_states\.pt$")


def universal_checkpoint_info(module: nn.Module) -> dict:
    """DeepSpeed's `universal_checkpoint_info` for a TP-sharded module: which parameters are
    replicated over TP and which are split along dim 1 (row-parallel); the rest split
    along dim 0, DeepSpeed's default; vocab-parallel ones with their real vocabulary size."""
    from deepspeed.checkpoint.constants import (
        ORIGINAL_VOCAB_SIZE,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        VOCABULARY_PARAMETER_PATTERNS,
    )

    replicated, rows, vocab, vocab_size = [], [], [], set()
    for name, p in module.named_parameters():
        dim = split_dim(p)
        pattern = re.escape(name) + "$"
        if dim is None:
            replicated.append(pattern)
        elif dim == 1:
            rows.append(pattern)
        elif dim != 0:
            raise ValueError(f"{name} is split over TP along dim {dim}; universal checkpoints "
                             "support dims 0 and 1")
        if getattr(p, "padded_rows_of", None):
            # DeepSpeed drops the padding rows when it merges, and pads at the new TP degree.
            vocab.append(pattern)
            vocab_size.add(p.padded_rows_of)
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows}
    if vocab:
        (info[ORIGINAL_VOCAB_SIZE],) = vocab_size
        info[VOCABULARY_PARAMETER_PATTERNS] = vocab
    return info


def is_universal(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def universal_source(folder: str | Path) -> dict:
    """What `to_universal` recorded: the source folder, its TP degree, DP x CP size and
    ZeRO stage."""
    return json.loads((Path(folder) / MARKER).read_text())


def _zero_stage(folder: Path) -> int:
    optim = sorted(p for p in folder.iterdir() if _OPTIM.search(p.name))
    if not optim:
        return 0
    sd = torch.load(optim[0], map_location="cpu", weights_only=False)
    return int(sd["optimizer_state_dict"].get("zero_stage", 1))


def _check_convertible(folder: Path) -> tuple[int, int, int]:
    """(TP, DP x CP, ZeRO stage) of a checkpoint ds_to_universal can convert, or a clear
    error."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    ranks = tp_model_files(folder)
    stage = _zero_stage(folder)
    if stage == 0:
        raise ConversionError(
            f"{folder} was saved with ZeRO stage 0, which keeps no ZeRO optimizer partitions "
            "to convert: resume=PATH carries its optimizer to any DP x CP size at the same "
            "TP degree; for another TP degree start with init.weights=PATH "
            "init.optimizer=reset")
    model_state = torch.load(ranks[0], map_location="cpu", weights_only=False)
    if UNIVERSAL_CHECKPOINT_INFO not in model_state:
        raise ConversionError(
            f"{ranks[0]} holds no {UNIVERSAL_CHECKPOINT_INFO} (the checkpoint was not written "
            "by this trainer): DeepSpeed cannot tell which tensors are split over TP")
    per_rank = {r: sum(1 for p in folder.iterdir()
                       if _OPTIM.search(p.name) and f"mp_rank_{r:02d}_" in p.name)
                for r in ranks}
    if len(set(per_rank.values())) != 1:
        raise ConversionError(
            f"{folder}: optimizer shards per TP rank {per_rank}; every TP rank needs one per "
            "data-parallel rank (a rank's files are missing)")
    return len(ranks), per_rank[0], stage


def to_universal(path: str | Path, output: str | Path, *, tag: str | None = None,
                 workers: int = 1) -> Path:
    """Convert a trainer checkpoint (any ZeRO stage >= 1, any TP/CP layout) into a
    universal checkpoint folder `output`, with DeepSpeed's `ds_to_universal`. The folder
    appears complete or not at all."""
    from deepspeed.checkpoint import ds_to_universal

    folder = resolve_checkpoint(path, tag)
    output = Path(output)
    if output.exists():
        raise ConversionError(f"{output} already exists; give a new folder")
    if not output.parent.is_dir():
        raise ConversionError(f"output folder {output.parent} does not exist")
    if (output.parent / "latest").is_file() and re.fullmatch(r"step\d{8}", output.name):
        raise ConversionError(
            f"{output} would sit among a run's own checkpoints, which the trainer deletes "
            "(checkpoint.keep_last): give another name or folder, e.g. RUN_DIR/universal")
    tp, dp_cp, stage = _check_convertible(folder)
    cfg = read_run_config(folder / "config.yaml")
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staged = Path(tmp) / output.name
        view = _input_view(folder, Path(tmp) / "input")
        args = argparse.Namespace(input_folder=str(view), output_folder=str(staged),
                                  num_extract_workers=workers, num_merge_workers=workers,
                                  keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            ds_to_universal.main(args)
        log.debug("ds_to_universal: %s", out.getvalue())
        _name_model_states_for_every_stage(staged)
        layout = parameter_layout(cfg)
        _complete_optimizer_state(staged, folder, stage, layout)
        check_state(read_universal_weights(staged), layout,
                    f"the weights converted from {folder}")
        shutil.copytree(folder / "trainer_state", staged / "trainer_state")
        shutil.copy2(folder / "config.yaml", staged / "config.yaml")
        (staged / MARKER).write_text(json.dumps(
            {"source": str(folder.resolve()), "tag": folder.name, "tp": tp, "dp_cp": dp_cp,
             "zero_stage": stage}, indent=1))
        staged.rename(output)
    return output


def _input_view(folder: Path, view: Path) -> Path:
    """The checkpoint as ds_to_universal can read it: megatron-core's linear layers save an
    `_extra_state` entry of None, on which DeepSpeed 0.19's converter fails; the model-state
    files are rewritten without such entries, everything else is linked."""
    view.mkdir()
    for path in folder.iterdir():
        if path.name.endswith("_model_states.pt"):
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("module") is not None:
                state["module"] = {k: v for k, v in state["module"].items() if v is not None}
            torch.save(state, view / path.name)
        elif path.is_file():
            (view / path.name).symlink_to(path.resolve())
    return view


def _name_model_states_for_every_stage(folder: Path) -> None:
    """DeepSpeed reads a universal checkpoint's model-state files (metadata only: the
    weights come from zero/) under the names of the *loading* run's ZeRO stage:
    `zero_pp_rank_0_mp_rank_XX_model_states.pt` for stage 3, `mp_rank_XX_model_states.pt`
    otherwise. Give each TP rank's file both names (a hard link where possible), so the
    folder loads at any stage."""
    for path in sorted(folder.glob("*mp_rank_*_model_states.pt")):
        rank = re.search(r"mp_rank_(\d+)_model_states", path.name).group(1)
        for name in (f"mp_rank_{rank}_model_states.pt",
                     f"zero_pp_rank_0_mp_rank_{rank}_model_states.pt"):
            target = folder / name
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)


def _complete_optimizer_state(staged: Path, source: Path, stage: int,
                              layout: dict[str, ParamInfo]) -> None:
    """Make `zero/` loadable at every ZeRO stage. ds_to_universal writes it in the source
    stage's shape, and DeepSpeed's loaders differ: stages 1/2 need `ds_version` and a
    `step.pt` per parameter (stage 3 sources have neither); stage 3 reads the step from
    `optimizer_state_dict` (stage 1/2 sources have none); stages 1/2 read each state as
    `{"param": full-shape tensor, "cat_dim": TP split dim}`, which a stage-3 source without
    TP writes as a bare flat tensor. The values come from the source's own optimizer file
    and the model's layout."""
    optim = sorted(p for p in source.iterdir() if _OPTIM.search(p.name))
    src = torch.load(optim[0], map_location="cpu", weights_only=False)
    inner = src["optimizer_state_dict"]
    base = inner["optimizer_state_dict"] if stage == 3 else inner["base_optimizer_state"]
    step = base["state"][0]["step"]  # every group steps together
    _complete_global_state(staged / "zero" / "optimizer_state.pt", step,
                           src.get("ds_version") or inner.get("ds_version"))
    for name, info in layout.items():
        _complete_param_states(staged / "zero" / name, name, info, step)


def _complete_global_state(path: Path, step, ds_version: str) -> None:
    """`optimizer_state.pt` with what every stage's loader reads; the stage-3 source's
    flat fp32 partition of rank 0, which fits no other layout, is dropped."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    groups = sd["param_groups"]
    sd.pop("fp32_flat_groups", None)
    sd["ds_version"] = ds_version
    sd["optimizer_state_dict"] = {"state": {i: {"step": step} for i in range(len(groups))},
                                  "param_groups": groups}
    torch.save(sd, path)


def _complete_param_states(folder: Path, name: str, info: ParamInfo, step) -> None:
    """One parameter's `step.pt`, and each state as a full-shape tensor with its TP dim."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    if not (folder / "fp32.pt").is_file():
        raise ConversionError(f"DeepSpeed's converter wrote no weights for {name}")
    if not (folder / "step.pt").exists():
        torch.save(step, folder / "step.pt")
    for f in folder.glob("*.pt"):
        if f.name == "step.pt":
            continue
        entry = torch.load(f, map_location="cpu", weights_only=False)
        if torch.is_tensor(entry):
            entry = {PARAM: entry}
        t = entry[PARAM]
        if t.numel() != prod(info.shape):
            raise ConversionError(f"{name}/{f.name} holds {t.numel()} values; the model's "
                                  f"{name} has shape {info.shape}")
        entry[PARAM] = t.reshape(info.shape)
        if info.partition_dim is None:
            entry.pop(CAT_DIM, None)
        else:
            entry[CAT_DIM] = info.partition_dim
        torch.save(entry, f)


def universal_state(folder: str | Path, key: str) -> dict[str, torch.Tensor]:
    """`{param name: full tensor}` of one state of a universal checkpoint: `fp32` (the
    weights), `exp_avg` or `exp_avg_sq`."""
    from deepspeed.checkpoint.constants import PARAM

    zero = Path(folder) / "zero"
    if not zero.is_dir():
        raise ConversionError(f"{folder} holds no zero/ folder: not a universal checkpoint")
    return {p.parent.relative_to(zero).as_posix():
            torch.load(p, map_location="cpu", weights_only=False)[PARAM]
            for p in sorted(zero.glob(f"**/{key}.pt"))}


def read_universal_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a universal checkpoint."""
    return universal_state(folder, "fp32")


def universal_model_config(folder: str | Path) -> ModelConfig:
    return read_run_config(Path(folder) / "config.yaml")
