"""A facebookresearch/DiT checkpoint (`models.py` layout) -> the MHLA DiT (an image model:
frames=1, patch=[1, p, p]).

Mapped (shapes checked for every tensor before anything is converted):

- `x_embedder.proj` (Conv2d `[hidden, C, p, p]`) -> `x_embedder` (linear over tokens laid out
  `(C, pt, ph, pw)`, `mhla_dist.model.patchify`): the same numbers, reshaped.
- `blocks.i.attn.qkv` (q, k, v stacked along dim 0, heads-major inside each, as our
  projections) -> `q_proj`, `k_proj`, `v_proj`; `attn.proj` -> `o_proj`; `mlp.fc1/fc2`,
  `t_embedder.mlp.{0,2}` (256 sinusoid frequencies, cos then sin, as ours) copied.
- `adaLN_modulation.1` copied: our chunk orders are DiT's (blocks: shift, scale, gate of the
  attention, then of the MLP; final layer: shift, scale), see `_BLOCK_CHUNKS`.
- `y_embedder.embedding_table` -> `y_embedder.table` (last row = the null class; a source
  trained without class dropout has no null row, so a zero row is created).
- `final_layer.linear`: DiT reads each token's outputs as `(ph, pw, C_out)`; the rows are
  reordered to our `(C, pt, ph, pw)`. With `learn_sigma` (`C_out = 2C`) only the first C
  channels (the mean) are kept; the variance rows are reported as dropped.
- `pos_embed` (DiT's fixed 2-D sincos buffer): dropped when our `pos_embed="sincos"` (ours
  is recomputed, a different 3-D embedding); with `pos_embed="learned"` it is copied,
  reordered from DiT's row-major tokens to our block-major ones, which keeps the source's.

Created: each MHLA block's `mixing` (`block_grid_mixing(block_grid, mixing_init)`, as the
model's own init; per head when `per_head_mixing`). Blocks in `softmax_layers` need none.

What changes functionally: MHLA replaces softmax attention (except `softmax_layers`), and
DiT predicts noise (and variance) at DDPM steps, ours a rectified-flow velocity at
`t * 1000`; the import is a starting point for fine-tuning, not an equivalent model.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from mhla_dist.config import DiTConfig
from mhla_dist.config.dit import DIT_PRESETS, dit_config
from mhla_dist.model.dit_layers import FREQUENCY_EMBEDDING_SIZE, sincos_pos_embed_3d
from mhla_dist.model.patchify import token_positions
from mhla_kernels import block_grid_mixing

from .files import write_consolidated
from .model_spec import ConversionError, check_state, parameter_layout
from .report import ConversionReport
from .source_files import read_safetensors_source

# The adaLN chunk orders of DiT's models.py and of mhla_dist.model.dit (the same, so the
# modulation weights are copied; `_permute_chunks` would reorder them otherwise).
_BLOCK_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
_OUR_BLOCK_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
_FINAL_CHUNKS = ("shift", "scale")
_OUR_FINAL_CHUNKS = ("shift", "scale")

Transform = Callable[[torch.Tensor], torch.Tensor]
# source key -> (expected source shape, [(target, transform, how)])
Plan = dict[str, tuple[tuple[int, ...], list[tuple[str, Transform, str]]]]


def read_dit_source(path: str | Path, *, key: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a `.pt`/`.pth` file (bare, or under `key`: default "ema", else
    "model") or of a safetensors file/folder; returns it and a note on where it came from."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_safetensors_source(path)[0], f"safetensors {path}"
    if not path.is_file():
        raise ConversionError(f"{path} does not exist (give a DiT .pt/.pth or .safetensors)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DiT's train.py "args"
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of all kinds
        raise ConversionError(f"{path} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    note = f"state dict {path}"
    if key is not None or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapper = key or next((k for k in ("ema", "model") if k in obj), None)
        if wrapper not in obj or not isinstance(obj[wrapper], dict):
            raise ConversionError(f"{path} holds no state dict under {wrapper or 'ema/model'!r}"
                                  f" (its keys: {', '.join(map(str, list(obj)[:8]))})")
        obj, note = obj[wrapper], f"{path} [{wrapper!r}]"
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{note}: entries that are not tensors: {bad[:5]}")
    return obj, note


def _shape(src: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in src:
        raise ConversionError(f"the source lacks {key} (not a facebookresearch DiT? keys "
                              f"found: {', '.join(sorted(src)[:6])} ...)")
    return tuple(src[key].shape)


def infer_dit_sizes(src: dict[str, torch.Tensor]) -> dict:
    """DiTConfig fields read from the shapes: hidden size, channels, patch, depth, MLP
    ratio, classes and the latent size (from `pos_embed`)."""
    conv = _shape(src, "x_embedder.proj.weight")
    if len(conv) != 4 or conv[2] != conv[3]:
        raise ConversionError(f"x_embedder.proj.weight has shape {conv}; expected a square "
                              "Conv2d kernel [hidden, C, p, p]")
    hidden, channels, p = conv[0], conv[1], conv[2]
    depth = len({k.split(".")[1] for k in src if k.startswith("blocks.")})
    fc1 = _shape(src, "blocks.0.mlp.fc1.weight")
    sizes = dict(hidden_size=hidden, in_channels=channels, patch=[1, p, p], depth=depth,
                 frames=1, mlp_ratio=fc1[0] / hidden)
    if "y_embedder.embedding_table.weight" in src:
        sizes["num_classes"] = _shape(src, "y_embedder.embedding_table.weight")[0] - 1
    else:
        sizes["num_classes"] = 0
    if "pos_embed" in src:
        tokens = _shape(src, "pos_embed")[-2]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ConversionError(f"pos_embed has {tokens} tokens, not a square patch grid")
        sizes["height"] = sizes["width"] = side * p
    return sizes


def dit_import_config(src: dict[str, torch.Tensor], preset: str | None = None,
                      **overrides) -> DiTConfig:
    """The MHLA DiT config: `preset` + `overrides`, or without a preset the sizes inferred
    from the shapes + `overrides` (which must then give `num_heads`)."""
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConversionError(f"unknown DiTConfig key(s) {unknown}; allowed: {sorted(known)}")
    if preset is None:
        if "num_heads" not in overrides:
            raise ConversionError("the heads cannot be read from the shapes: give num_heads "
                                  f"or a preset ({', '.join(DIT_PRESETS)})")
        values = {**infer_dit_sizes(src), **overrides}
    elif preset not in DIT_PRESETS:
        raise ConversionError(f"preset={preset!r} is not one of {', '.join(DIT_PRESETS)}")
    else:
        values = overrides
    try:
        cfg = dit_config(preset, **values)
    except ValueError as exc:
        raise ConversionError(f"invalid DiT config: {exc}") from None
    if cfg.frames != 1 or cfg.patch[0] != 1 or cfg.patch[1] != cfg.patch[2]:
        raise ConversionError(f"a DiT checkpoint is an image model: frames=1 and patch=[1, p, "
                              f"p] (got frames={cfg.frames}, patch={cfg.patch})")
    return cfg


def _dit_to_block_major(cfg: DiTConfig) -> torch.Tensor:
    """For each of our block-major tokens, the index of the same patch in DiT's row-major
    token order."""
    pos = token_positions(cfg.patch_grid, cfg.block_grid)
    return pos[:, 1] * cfg.patch_grid[2] + pos[:, 2]


def _permute_chunks(w: torch.Tensor, src: tuple[str, ...], dst: tuple[str, ...]
                    ) -> torch.Tensor:
    parts = w.chunk(len(src), dim=0)
    return torch.cat([parts[src.index(name)] for name in dst], dim=0)


def _final_rows(w: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """`[p*p*C_out, ...]` rows in DiT's `(ph, pw, C_out)` order -> our `(C, pt=1, ph, pw)`
    order, first C channels only."""
    p, c = cfg.patch[1], cfg.in_channels
    w = w.reshape(p, p, -1, *w.shape[1:])[:, :, :c]
    return w.movedim(2, 0).reshape(c * p * p, *w.shape[3:])


def _plan(src: dict[str, torch.Tensor], cfg: DiTConfig, rep: ConversionReport) -> Plan:
    h, p, c = cfg.hidden_size, cfg.patch[1], cfg.in_channels
    copy = "copied"
    out_rows = c * p * p
    if tuple(src.get("final_layer.linear.weight", torch.empty(0)).shape[:1]) == (2 * out_rows,):
        out_rows *= 2  # learn_sigma: mean and variance channels
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            rep.drop(f"{key}[variance rows]", f"learn_sigma: output channels {c}..{2 * c - 1} "
                     "(the variance) have no place; the mean channels are kept")

    def same(target: str) -> list[tuple[str, Transform, str]]:
        return [(target, lambda w: w, copy)]

    chunks = "copied (same adaLN chunk order)"
    if _BLOCK_CHUNKS != _OUR_BLOCK_CHUNKS:
        chunks = "adaLN chunks reordered"
    plan: Plan = {
        "x_embedder.proj.weight": ((h, c, p, p), [(
            "x_embedder.weight", lambda w: w.reshape(h, -1), "Conv2d [hidden, C, p, p] -> "
            "linear over (C, pt=1, ph, pw) tokens")]),
        "x_embedder.proj.bias": ((h,), same("x_embedder.bias")),
        "t_embedder.mlp.0.weight": ((h, FREQUENCY_EMBEDDING_SIZE), same("t_embedder.mlp.0.weight")),
        "t_embedder.mlp.0.bias": ((h,), same("t_embedder.mlp.0.bias")),
        "t_embedder.mlp.2.weight": ((h, h), same("t_embedder.mlp.2.weight")),
        "t_embedder.mlp.2.bias": ((h,), same("t_embedder.mlp.2.bias")),
        "final_layer.linear.weight": ((out_rows, h), [(
            "final_layer.linear.weight", lambda w: _final_rows(w, cfg),
            "rows (ph, pw, C_out) -> (C, pt, ph, pw), first C channels")]),
        "final_layer.linear.bias": ((out_rows,), [(
            "final_layer.linear.bias", lambda w: _final_rows(w, cfg),
            "(ph, pw, C_out) -> (C, pt, ph, pw), first C channels")]),
    }
    for part in ("weight", "bias"):
        shape = (2 * h, h) if part == "weight" else (2 * h,)
        plan[f"final_layer.adaLN_modulation.1.{part}"] = (shape, [(
            f"final_layer.adaLN_modulation.1.{part}",
            lambda w: _permute_chunks(w, _FINAL_CHUNKS, _OUR_FINAL_CHUNKS), chunks)])
    if cfg.num_classes:
        rows = src.get("y_embedder.embedding_table.weight", torch.empty(0)).shape[:1]
        n = cfg.num_classes + (tuple(rows) != (cfg.num_classes,))
        how = copy if n > cfg.num_classes else "null-class row created as zeros"
        plan["y_embedder.embedding_table.weight"] = ((n, h), [(
            "y_embedder.table.weight",
            lambda w: torch.cat([w, w.new_zeros(cfg.num_classes + 1 - len(w), h)]), how)])
    for i in range(cfg.depth):
        s, t = f"blocks.{i}.", f"blocks.{i}."
        for part, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
            plan[f"{s}attn.qkv.{part}"] = (shape, [
                (f"{t}attn.{name}_proj.{part}", lambda w, j=j: w.chunk(3, 0)[j],
                 f"rows {j * h}:{(j + 1) * h} of the fused qkv")
                for j, name in enumerate("qkv")])
            six = (6 * h, h) if part == "weight" else (6 * h,)
            plan[f"{s}adaLN_modulation.1.{part}"] = (six, [(
                f"{t}adaLN_modulation.1.{part}",
                lambda w: _permute_chunks(w, _BLOCK_CHUNKS, _OUR_BLOCK_CHUNKS), chunks)])
        m = cfg.mlp_hidden_size
        for src_name, dst_name, w_shape in (("attn.proj", "attn.o_proj", (h, h)),
                                            ("mlp.fc1", "mlp.fc1", (m, h)),
                                            ("mlp.fc2", "mlp.fc2", (h, m))):
            plan[f"{s}{src_name}.weight"] = (w_shape, same(f"{t}{dst_name}.weight"))
            plan[f"{s}{src_name}.bias"] = ((w_shape[0],), same(f"{t}{dst_name}.bias"))
    if "pos_embed" in src:
        if cfg.pos_embed == "learned":
            idx = _dit_to_block_major(cfg)
            plan["pos_embed"] = ((1, cfg.num_tokens, h), [(
                "pos_embed", lambda w: w.reshape(cfg.num_tokens, h)[idx],
                "DiT's fixed 2-D sincos, reordered row-major -> block-major, now learned")])
        elif tuple(src["pos_embed"].shape) != (1, cfg.num_tokens, h):
            raise ConversionError(
                f"pos_embed has shape {tuple(src['pos_embed'].shape)}; the config's "
                f"{cfg.height}x{cfg.width} latents with patch {p} expect (1, {cfg.num_tokens}, "
                f"{h}) (pass height=/width= for another image size)")
        else:
            rep.drop("pos_embed", "DiT's fixed 2-D sincos buffer; ours (3-D sincos) is "
                     "recomputed (pos_embed='learned' keeps the source's)")
    return plan


def convert_dit_state(src: dict[str, torch.Tensor], cfg: DiTConfig
                      ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map DiT tensors to the MHLA DiT's names; raises `ConversionError` naming every key
    or shape that does not fit, before anything is converted."""
    rep = ConversionReport()
    plan = _plan(src, cfg, rep)
    missing = [k for k in plan if k not in src]
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} DiT tensors for this config, "
                              f"e.g. {', '.join(missing[:5])} (config: hidden_size="
                              f"{cfg.hidden_size}, depth={cfg.depth}, num_classes="
                              f"{cfg.num_classes})")
    unknown = [f"{k} {tuple(src[k].shape)}" for k in src if k not in plan and k != "pos_embed"]
    if unknown:
        raise ConversionError(f"source tensors with no place in the MHLA DiT: "
                              f"{'; '.join(unknown[:8])}")
    bad = [f"{k}: {tuple(src[k].shape)}, expected {shape}" for k, (shape, _) in plan.items()
           if tuple(src[k].shape) != shape]
    if bad:
        raise ConversionError("source shapes do not match the config: " + "; ".join(bad[:8]))
    out: dict[str, torch.Tensor] = {}
    for key, (_, targets) in plan.items():
        for target, fn, how in targets:
            out[target] = fn(src[key].float()).contiguous()
            rep.map(key, target, out[target], how)
    if cfg.pos_embed == "learned" and "pos_embed" not in out:
        out["pos_embed"] = sincos_pos_embed_3d(cfg.hidden_size, cfg.patch_grid, cfg.block_grid)
        rep.create("pos_embed", out["pos_embed"], "3-D sincos (the source has none)")
    create_mixing(cfg, out, rep)
    check_state(out, parameter_layout(cfg), "the converted weights")
    return out, rep


def create_mixing(cfg: DiTConfig, out: dict[str, torch.Tensor], rep: ConversionReport) -> None:
    """Every MHLA block's `Mc` (`blocks.i.attn.mixing`) at the model's own init,
    `block_grid_mixing` of the 3-D block grid (per head when `per_head_mixing`), into
    `out`, each reported as created; blocks in `softmax_layers` have none."""
    mixing = block_grid_mixing(tuple(cfg.block_grid), cfg.mixing_init)
    if cfg.per_head_mixing:
        mixing = mixing.expand(cfg.num_heads, -1, -1)
    for i in range(cfg.depth):
        if i not in cfg.softmax_layers:
            out[f"blocks.{i}.attn.mixing"] = mixing.clone().contiguous()
            rep.create(f"blocks.{i}.attn.mixing", mixing, f"block_grid_mixing({cfg.block_grid}, "
                       f"{cfg.mixing_init!r}), the model's init")


def import_dit(source: str | Path, output: str | Path, *, preset: str | None = None,
               dtype: str = "fp32", checkpoint_key: str | None = None,
               **overrides) -> ConversionReport:
    """Convert a facebookresearch DiT checkpoint to consolidated MHLA DiT weights at
    `output` (+ `model_config.json` beside it and `<output>.report.json`).

    `preset` ("s2", "b2", "xl2", ...) plus DiTConfig `overrides` give the config; without
    a preset the sizes come from the shapes and `num_heads` must be in `overrides`.
    `checkpoint_key`: the entry of a training checkpoint to read (default "ema", else
    "model")."""
    src, where = read_dit_source(source, key=checkpoint_key)
    cfg = dit_import_config(src, preset, **overrides)
    state, rep = convert_dit_state(src, cfg)
    rep.notes.append(f"source: {where}")
    rep.notes.append("softmax attention -> MHLA and DiT's noise/variance output -> velocity: "
                     "fine-tune before use")
    write_consolidated(state, output, cfg, dtype=dtype, metadata={"source": str(source)})
    rep.write(Path(output).with_suffix(".report.json"))
    return rep
