"""Consolidated weights on disk: one safetensors file, the model config beside it.

    OUTPUT.safetensors      every parameter, full (TP-merged) shape, named as the model
    model_config.json       the model config (what `Trainer.save_consolidated` writes too)

The config is also kept in the safetensors metadata (`mhla_model_config`), so the file
alone is enough. Writes go to temporary files beside the targets and are renamed into
place at the end: a failure leaves nothing partial.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .model_spec import ConversionError, ModelConfig, model_config_from_dict, model_config_json

CONFIG_JSON = "model_config.json"
CONFIG_METADATA = "mhla_model_config"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_consolidated(state: dict[str, torch.Tensor], path: str | Path,
                       cfg: ModelConfig | None, *, dtype: str = "fp32",
                       metadata: dict[str, str] | None = None) -> Path:
    """Write `state` (cast to `dtype`) to `path`, and `cfg` as `model_config.json` beside
    it; both appear at once, or neither."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ConversionError(f"output folder {path.parent} does not exist")
    torch_dtype = resolve_dtype(dtype)
    tensors = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    if cfg is not None:
        meta[CONFIG_METADATA] = json.dumps(json.loads(model_config_json(cfg)))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp_cfg = path.with_name(f".{CONFIG_JSON}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        if cfg is not None:
            tmp_cfg.write_text(model_config_json(cfg))
            os.replace(tmp_cfg, path.with_name(CONFIG_JSON))
        os.replace(tmp, path)
    finally:
        for t in (tmp, tmp_cfg):
            t.unlink(missing_ok=True)
    return path


def read_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """The tensors of a safetensors file and the model config (its metadata, else
    `model_config.json` beside it, else None)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist (expected a .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as exc:  # safetensors raises its own error types
        raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
    cfg = None
    if CONFIG_METADATA in meta:
        cfg = model_config_from_dict(json.loads(meta[CONFIG_METADATA]))
    elif (path.parent / CONFIG_JSON).is_file():
        cfg = model_config_from_dict(json.loads((path.parent / CONFIG_JSON).read_text()))
    return state, cfg
