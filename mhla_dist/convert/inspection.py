"""What a checkpoint holds, as text: the tensor tree (shapes, dtypes), parameter counts,
the model config and statistics of the `Mc` (mixing) matrices.

Works on a consolidated safetensors file, a DeepSpeed checkpoint folder of the trainer
(consolidated in memory first, so shapes are the full, TP-merged ones) or a universal
checkpoint folder (its fp32 weights).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from .files import read_consolidated
from .model_spec import ConversionError, ModelConfig, model_config_json
from .universal import (
    is_universal,
    read_universal_weights,
    universal_model_config,
    universal_source,
)
from .zero import consolidate_zero_checkpoint, resolve_checkpoint, tp_model_files


def load_any(path: str | Path, tag: str | None = None
             ) -> tuple[dict[str, torch.Tensor], ModelConfig | None, str]:
    """`(tensors, model config or None, a one-line description of the source)`."""
    path = Path(path)
    if path.is_file():
        state, cfg = read_consolidated(path)
        return state, cfg, f"safetensors file {path}"
    if path.is_dir() and is_universal(path):
        src = universal_source(path)
        return (read_universal_weights(path), universal_model_config(path),
                f"universal checkpoint {path} (converted from TP = {src['tp']}, "
                f"DP x CP = {src['dp_cp']}, ZeRO {src['zero_stage']}; optimizer state kept)")
    if path.is_dir():
        folder = resolve_checkpoint(path, tag)
        state, cfg = consolidate_zero_checkpoint(folder)
        tp = len(tp_model_files(folder))
        return state, cfg, f"DeepSpeed checkpoint {folder} (TP = {tp}, consolidated)"
    raise ConversionError(f"{path} does not exist (give a .safetensors file or a "
                          "checkpoint folder)")


def tensor_tree(state: dict[str, torch.Tensor]) -> list[str]:
    """One line per tensor, indented by its dotted path; shared prefixes printed once."""
    lines, prev = [], []
    for name, t in state.items():
        parts = name.split(".")
        common = 0
        while common < min(len(prev), len(parts) - 1) and prev[common] == parts[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth] + "/")
        shape = "x".join(map(str, t.shape)) or "scalar"
        indent = "  " * (len(parts) - 1)
        lines.append(f"{indent}{parts[-1]:<{max(1, 36 - len(indent))}} {shape:<14} "
                     f"{str(t.dtype).removeprefix('torch.'):<9} {t.numel():>12,}")
        prev = parts[:-1]
    return lines


def parameter_counts(state: dict[str, torch.Tensor]) -> OrderedDict:
    """Elements per top-level module (`embed`, `layers`, `blocks`, ...), and in total."""
    counts: OrderedDict[str, int] = OrderedDict()
    for name, t in state.items():
        top = name.split(".")[0]
        counts[top] = counts.get(top, 0) + t.numel()
    counts["total"] = sum(t.numel() for t in state.values())
    return counts


def mixing_stats(mc: torch.Tensor) -> dict[str, float]:
    """Statistics of an `Mc` `[M, M]` or `[H, M, M]`: range, diagonal, row sums, and how
    much weight sits strictly below / above the diagonal (causal models ignore above)."""
    m = mc.float()
    size = m.shape[-1]
    lower = torch.ones(size, size).tril(-1).bool()
    upper = lower.T
    eye = torch.eye(size).bool()
    rows = m.sum(-1)
    return {"min": m.min().item(), "max": m.max().item(), "mean": m.mean().item(),
            "diag_mean": m[..., eye].mean().item(),
            "row_sum_min": rows.min().item(), "row_sum_max": rows.max().item(),
            "lower_abs_mean": m[..., lower].abs().mean().item() if size > 1 else 0.0,
            "upper_abs_max": m[..., upper].abs().max().item() if size > 1 else 0.0}


def describe(path: str | Path, tag: str | None = None) -> str:
    """The whole report for `path` as text."""
    state, cfg, source = load_any(path, tag)
    out = [f"# {source}", "", "## config"]
    out.append(model_config_json(cfg) if cfg is not None else "(no model config found)")
    out += ["", f"## tensors ({len(state)})", *tensor_tree(state), "", "## parameters"]
    out += [f"{k:<20} {v:>14,}" for k, v in parameter_counts(state).items()]
    mixing = {n: t for n, t in state.items() if n.endswith("mixing")}
    out += ["", f"## mixing (Mc) matrices ({len(mixing)})"]
    for name, mc in mixing.items():
        s = mixing_stats(mc)
        out.append(f"{name} {'x'.join(map(str, mc.shape))}: "
                   + " ".join(f"{k}={v:.4g}" for k, v in s.items()))
    return "\n".join(out)
