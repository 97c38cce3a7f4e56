"""DeepSpeed ZeRO checkpoints (any stage, any TP/CP layout) -> one consolidated state.

A checkpoint folder of the trainer (`run_dir/checkpoints/stepXXXXXXXX/`) holds, for each
TP rank `t`, DeepSpeed's `*mp_rank_{t:02d}_model_states.pt` and (ZeRO >= 1) one
`*_optim_states.pt` per data-parallel rank (DP x CP: CP ranks are data-parallel replicas
to ZeRO). DeepSpeed's `zero_to_fp32` rebuilds the fp32 weights of *one* model-parallel
rank from its ZeRO shards, but it globs every file of the folder, so with TP > 1 it is
run once per TP rank on a view of the folder that holds only that rank's files
(symlinks). The TP shards are then concatenated along each parameter's split dim
(`model_spec.parameter_layout`); replicated parameters are taken from TP rank 0 after
checking every rank holds the same shape. ZeRO stage 0 has no optimizer shards: the
weights are the `module` of each `mp_rank_XX_model_states.pt`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path

import torch

from .files import write_consolidated
from .model_spec import ConversionError, ModelConfig, check_state, parameter_layout, read_run_config

log = logging.getLogger("mhla_dist.convert")
_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The tag folder of a checkpoint given as the tag folder itself, a `checkpoints/`
    folder (with `latest`, or `tag`), or a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"checkpoint folder {path} does not exist")
    if tag is None and any(_MODEL_FILE.search(p.name) for p in path.iterdir()):
        return path
    for root in (path, path / "checkpoints"):
        if tag is not None and (root / tag).is_dir():
            return root / tag
        if tag is None and (root / "latest").is_file():
            found = root / (root / "latest").read_text().strip()
            if found.is_dir():
                return found
            raise ConversionError(f"{root / 'latest'} names {found.name}, which does not exist")
    what = f"no tag folder {tag!r}" if tag else "no DeepSpeed model states and no 'latest' file"
    raise ConversionError(f"{path}: {what}; give a checkpoint folder like "
                          "run_dir/checkpoints/step00000100 or its parent with --tag")


def tp_model_files(folder: Path) -> dict[int, Path]:
    """`{TP rank: one of its model-state files}`; every rank 0..TP-1 must be present."""
    ranks: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        m = _MODEL_FILE.search(p.name)
        if m:
            ranks.setdefault(int(m.group(1)), p)
    if not ranks:
        raise ConversionError(f"{folder} holds no DeepSpeed *_model_states.pt files")
    if sorted(ranks) != list(range(len(ranks))):
        raise ConversionError(f"{folder}: model states for TP ranks {sorted(ranks)}; expected "
                              f"0..{max(ranks)} (a rank's files are missing)")
    return ranks


def _rank_fp32_state(folder: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's full-over-DP fp32 weights, by DeepSpeed's own zero_to_fp32."""
    mine = f"mp_rank_{tp_rank:02d}_"
    optim = [p for p in folder.iterdir() if mine in p.name and p.name.endswith("_optim_states.pt")]
    if not optim:  # ZeRO 0: the module holds the weights, a bf16 one only rounded copies
        return _zero0_fp32_state(folder / f"{mine}model_states.pt")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / folder.name
        view.mkdir()
        for p in folder.iterdir():
            if mine in p.name:
                (view / p.name).symlink_to(p.resolve())
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # progress bars
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=folder.name)
        log.debug("zero_to_fp32 (TP rank %d): %s", tp_rank, out.getvalue())
    return state


def _zero0_fp32_state(path: Path) -> dict[str, torch.Tensor]:
    """A ZeRO-0 checkpoint's fp32 weights: under bf16 DeepSpeed's mixed-precision optimizer
    keeps the fp32 masters (`fp32_groups`, in the order of the optimizer's parameter
    groups, which the trainer records as `param_group_names`); the `module` holds the
    weights of an fp32 run."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    # torch.is_tensor: megatron-core's linears add `_extra_state: None` entries.
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in saved["module"].items() if torch.is_tensor(v)}
    groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if groups is None:
        return state
    names = saved.get("param_group_names")
    if names is None:
        log.warning("%s: a mixed-precision ZeRO-0 checkpoint without the trainer's "
                    "param_group_names (saved before they were recorded): taking the "
                    "module's rounded weights, not the fp32 masters", path)
        return state
    flat_names = [n for group in names for n in group]
    masters = [t for group in groups for t in group]
    if len(flat_names) != len(masters):
        raise ConversionError(f"{path}: {len(masters)} fp32 master tensors for "
                              f"{len(flat_names)} recorded parameter names")
    for name, master in zip(flat_names, masters, strict=True):
        if name not in state or state[name].shape != master.shape:
            raise ConversionError(f"{path}: fp32 master {name} {tuple(master.shape)} does not "
                                  "match the module's weights")
        state[name] = master.float()
    return state


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], layout: dict) -> dict[str, torch.Tensor]:
    """Concatenate TP shards along each parameter's split dim (layout: `ParamInfo`s), the
    padding rows of a vocab-parallel tensor dropped (the layout holds the real size)."""
    tp = len(shards)
    for rank, shard in enumerate(shards):
        missing = [n for n in layout if n not in shard]
        if missing:
            raise ConversionError(f"TP rank {rank}'s weights lack {', '.join(missing[:8])}: "
                                  "the checkpoint does not match its config")
    merged = {}
    for name, info in layout.items():
        parts = [s[name] for s in shards]
        if info.partition_dim is None or tp == 1:
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ConversionError(f"{name} is replicated over TP but the ranks hold "
                                      f"shapes {sorted(shapes)}")
            merged[name] = parts[0]
        else:
            full = torch.cat(parts, dim=info.partition_dim)
            excess = full.shape[info.partition_dim] - info.shape[info.partition_dim]
            if 0 < excess < tp:  # a vocab-parallel tensor's padding rows (< one per rank)
                full = full.narrow(info.partition_dim, 0, info.shape[info.partition_dim])
            merged[name] = full
    return merged


def consolidate_zero_checkpoint(path: str | Path, tag: str | None = None, *,
                                layout: dict | None = None
                                ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The full fp32 weights (ZeRO shards and TP shards merged) and the model config of a
    trainer checkpoint. `layout` (`ParamInfo`s; default: built from the checkpoint's config
    on one process) says each parameter's full shape and TP split dim; a distributed run
    passes its live model's (`reshard.full_layout`)."""
    folder = resolve_checkpoint(path, tag)
    cfg = read_run_config(folder / "config.yaml")
    ranks = tp_model_files(folder)
    layout = parameter_layout(cfg) if layout is None else layout
    shards = [_rank_fp32_state(folder, r) for r in sorted(ranks)]
    state = merge_tp_shards(shards, layout)
    check_state(state, layout, f"the weights in {folder}")
    return state, cfg


def zero_to_safetensors(path: str | Path, output: str | Path, *, tag: str | None = None,
                        dtype: str = "fp32") -> Path:
    """Consolidate a checkpoint into `output` (+ `model_config.json` beside it)."""
    state, cfg = consolidate_zero_checkpoint(path, tag)
    folder = resolve_checkpoint(path, tag)
    return write_consolidated(state, output, cfg, dtype=dtype,
                              metadata={"source": str(folder), "tag": folder.name})
