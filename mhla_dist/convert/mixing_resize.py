"""Resize learned `Mc` matrices when `max_seq_len`, the block size or the block grid changes.

How: `Mc` is treated as a function of the normalised positions of its row block and its
column block (block `i` of `M` sits at `i / (M - 1)`), and resampled by linear
interpolation along each block axis with `align_corners=True` (the first and last blocks
keep their values; same size = unchanged). Along one axis that is a matrix
`W [M', M]`, so a 1-D `Mc` becomes `W Mc W^T` (= bilinear, `F.interpolate(...,
mode="bilinear", align_corners=True)`); a 2-D/3-D block grid `(fb, hb, wb)` is a 4-/6-D
tensor over (row block, column block) and is resampled separably, one axis at a time
(= multilinear interpolation), which needs no 6-D interpolate.

Causal LMs: the strict upper triangle is re-masked to zero (causal models ignore it
anyway), and each row is rescaled to the row sum the source had at the same relative
position (interpolated): with `normalize=False` the row sum sets the scale of the mixed
state each block reads, which the masking would otherwise change near the diagonal.
Vision/video (`normalize=True`): a row's scale cancels between numerator and
denominator, so nothing is renormalised. When the grid changes its number of axes, there
is nothing to interpolate between: `Mc` is re-initialised by the distance rule
(`block_grid_mixing`), and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from mhla_dist.config import DiTConfig, LMConfig
from mhla_kernels import block_grid_mixing

from .files import read_consolidated, write_consolidated
from .model_spec import ConversionError, check_state, model_config_from_dict, parameter_layout
from .report import ConversionReport


def interpolation_matrix(new: int, old: int) -> torch.Tensor:
    """`W [new, old]`: linear interpolation with aligned corners (`W @ x` resamples x)."""
    if new < 1 or old < 1:
        raise ConversionError(f"cannot resize {old} blocks to {new}")
    if old == 1:
        return torch.ones(new, 1, dtype=torch.float64)
    pos = torch.linspace(0, old - 1, new, dtype=torch.float64) if new > 1 else \
        torch.zeros(1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=old - 2)
    frac = pos - lo
    w = torch.zeros(new, old, dtype=torch.float64)
    w[torch.arange(new), lo] = 1 - frac
    w[torch.arange(new), lo + 1] += frac
    return w


def resize_grid(mc: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
                ) -> torch.Tensor:
    """`Mc` `[..., M, M]` over block grid `old_grid` -> `[..., M', M']` over `new_grid`
    (same number of axes), multilinear over (row block, column block) coordinates."""
    old_grid, new_grid = list(old_grid), list(new_grid)
    if len(old_grid) != len(new_grid):
        raise ConversionError(f"block grids {old_grid} and {new_grid} differ in axes")
    m = math.prod(old_grid)
    if tuple(mc.shape[-2:]) != (m, m):
        raise ConversionError(f"Mc of shape {tuple(mc.shape)} does not fit block grid "
                              f"{old_grid} ({m} blocks)")
    lead, k = mc.shape[:-2], len(old_grid)
    x = mc.double().reshape(*lead, *old_grid, *old_grid)
    for axis in range(2 * k):
        w = interpolation_matrix(new_grid[axis % k], old_grid[axis % k])
        dim = len(lead) + axis
        x = torch.tensordot(x, w, dims=([dim], [1])).movedim(-1, dim)
    m_new = math.prod(new_grid)
    return x.reshape(*lead, m_new, m_new).to(mc.dtype)


def resize_causal(mc: torch.Tensor, new_m: int) -> torch.Tensor:
    """A causal `Mc` `[..., M, M]` -> `[..., M', M']`: bilinear, upper triangle re-masked,
    rows rescaled to the source's (interpolated) row sums."""
    old_m = mc.shape[-1]
    out = resize_grid(mc.double(), [old_m], [new_m]).tril()
    target = (interpolation_matrix(new_m, old_m) @ mc.double().tril().sum(-1).unsqueeze(-1)
              ).squeeze(-1)
    sums = out.sum(-1)
    scale = torch.where(sums.abs() > 1e-12, target / sums.where(sums.abs() > 1e-12, 1.0), 1.0)
    return (out * scale.unsqueeze(-1)).to(mc.dtype)


def resize_checkpoint_mixing(source: str | Path, output: str | Path, overrides: dict,
                             *, dtype: str = "fp32") -> ConversionReport:
    """Consolidated weights -> the same with `overrides` applied to the model config
    (`max_seq_len`, `block_size`, `num_blocks`; DiT: `block_grid`), every `Mc` resized."""
    state, cfg = read_consolidated(source)
    if cfg is None:
        raise ConversionError(f"{source} carries no model config (model_config.json)")
    allowed = {"max_seq_len", "block_size", "num_blocks"} if isinstance(cfg, LMConfig) \
        else {"block_grid"}
    unknown = set(overrides) - allowed
    if unknown:
        raise ConversionError(f"cannot change {sorted(unknown)} here; allowed: {sorted(allowed)}")
    data = asdict(cfg)
    if isinstance(cfg, LMConfig) and ("block_size" in overrides or "num_blocks" in overrides
                                      or "max_seq_len" in overrides):
        data.update(block_size=None, num_blocks=None)
        data.update(overrides)
        if data["block_size"] is None and data["num_blocks"] is None:
            data["block_size"] = cfg.block_size
    else:
        data.update(overrides)
    new = model_config_from_dict(data)
    if isinstance(new, DiTConfig) and new.pos_embed == "learned" and \
            list(new.block_grid) != list(cfg.block_grid):
        raise ConversionError("a learned pos_embed is stored in block-major token order, which "
                              "a new block_grid reorders; not supported (use sincos)")
    check_state(state, parameter_layout(cfg), f"the weights in {source}")
    rep, out = ConversionReport(), dict(state)
    for name, mc in state.items():
        if not name.endswith("mixing"):
            continue
        if isinstance(new, LMConfig):
            out[name] = resize_causal(mc, new.num_blocks)
            how = (f"bilinear {cfg.num_blocks} -> {new.num_blocks} blocks, re-masked, "
                   "row sums kept")
        elif len(new.block_grid) == len(cfg.block_grid):
            out[name] = resize_grid(mc, cfg.block_grid, new.block_grid)
            how = (f"separable linear over block grid {list(cfg.block_grid)} -> "
                   f"{list(new.block_grid)}")
        else:
            fresh = block_grid_mixing(tuple(new.block_grid), new.mixing_init)
            out[name] = fresh.expand(*mc.shape[:-2], -1, -1).clone().to(mc.dtype)
            how = f"re-initialised ({new.mixing_init}): the grid changed its axes"
        rep.map(name, name, out[name], how)
    check_state(out, parameter_layout(new), "the resized weights")
    rep.notes.append(f"config: {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    write_consolidated(out, output, new, dtype=dtype, metadata={"source": str(source)})
    return rep

