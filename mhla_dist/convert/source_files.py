"""Reading a third-party checkpoint: one safetensors file, or a folder of (sharded)
safetensors files with its `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model_spec import ConversionError


def read_safetensors_source(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a `.safetensors` file, or of every `*.safetensors` in a folder; returns
    them and the folder that holds the files."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{path} holds no .safetensors files")
        folder = path
    elif path.is_file():
        files, folder = [path], path.parent
    else:
        raise ConversionError(f"{path} does not exist (give a .safetensors file or a folder "
                              "of them)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{f} is not a readable safetensors file: {exc}") from None
        clash = set(part) & set(state)
        if clash:
            raise ConversionError(f"{f} repeats tensors already read: {sorted(clash)[:5]}")
        state.update(part)
    return state, folder


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None
