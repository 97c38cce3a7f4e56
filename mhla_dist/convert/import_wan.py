"""A diffusers `WanTransformer3DModel` folder (`config.json` + one or sharded safetensors,
e.g. Wan2.1-T2V-1.3B-Diffusers' `transformer/`) -> the MHLA DiT of `arch: wan`
(`mhla_dist.model.wan`).

Mapped (names and shapes checked for every tensor before anything is converted):

- `patch_embedding` (Conv3d `[hidden, C, pt, ph, pw]`) -> `x_embedder` (a linear over
  tokens laid out `(C, pt, ph, pw)`): the same numbers, reshaped.
- `condition_embedder.time_embedder.linear_{1,2}` -> `t_embedder.mlp.{0,2}` (256
  frequencies, cos then sin, as ours); `condition_embedder.time_proj` -> `time_proj`;
  `condition_embedder.text_embedder.linear_{1,2}` -> `text_embedder.linear_{1,2}`.
- `blocks.i.attn1` / `attn2` `{to_q, to_k, to_v, to_out.0, norm_q, norm_k}` ->
  `blocks.i.attn` / `cross_attn` `{q_proj, k_proj, v_proj, o_proj, norm_q, norm_k}`;
  `norm2` (the affine cross-attention norm), `ffn.net.0.proj` / `ffn.net.2` -> `mlp.fc1` /
  `fc2`, `scale_shift_table` -> `modulation` (same chunk order: shift, scale, gate of the
  self-attention, then of the FFN).
- `scale_shift_table` (the head's shift, scale) -> `head.modulation`; `proj_out`: Wan
  reads each token's outputs as `(pt, ph, pw, C)`; the rows are reordered to our
  `(C, pt, ph, pw)` -> `head.linear`.

Created: each MHLA block's `mixing` (`block_grid_mixing(block_grid, mixing_init)`, the
model's init; per head when `per_head_mixing`). Blocks in `softmax_layers` need none.

Refused: image conditioning (`image_dim`, `added_kv_proj_dim`: I2V / FLF2V), another
`qk_norm` than "rms_norm_across_heads", `cross_attn_norm=False`, `out_channels !=
in_channels`, and any tensor or config key not listed here.

What changes functionally: nothing in `softmax_layers` (with every layer there the import
computes what diffusers computes, tokens in block-major order, RoPE at the same patch
coordinates); elsewhere MHLA replaces softmax self-attention, a starting point for
fine-tuning. Time: diffusers takes `timestep = 1000 t`, ours `t` in [0, 1] (the velocity
`noise - x0` in both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from mhla_dist.config import DiTConfig
from mhla_dist.config.dit import DIT_PRESETS, dit_config
from mhla_dist.model.dit_layers import FREQUENCY_EMBEDDING_SIZE

from .files import write_consolidated
from .import_dit import create_mixing
from .model_spec import ConversionError, check_state, parameter_layout
from .report import ConversionReport
from .source_files import read_json, read_safetensors_source

WAN_CLASS = "WanTransformer3DModel"
# diffusers' WanRotaryPosEmbed and T2V pipeline constants, not in config.json.
WAN_ROPE_THETA = 10000.0
WAN_TEXT_LEN = 512
# config.json keys understood here; the ones not mapped to a DiTConfig field must hold
# the value that needs no other code (None = absent).
_WAN_KEYS = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
             "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
             "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
             "rope_max_seq_len", "pos_embed_seq_len"}
# The clip, which a Wan transformer does not fix: from a preset or key=value overrides.
CLIP_KEYS = ("frames", "height", "width", "block_grid")

Transform = Callable[[torch.Tensor], torch.Tensor]
# source key -> (expected source shape, target, transform, how)
Plan = dict[str, tuple[tuple[int, ...], str, Transform, str]]


def read_wan_config(folder: Path) -> dict:
    """The diffusers `config.json` of a Wan transformer folder, refused unless it is a
    text-to-video `WanTransformer3DModel` this importer maps."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder (give a diffusers "
                              f"{WAN_CLASS} folder: config.json + safetensors)")
    hf = read_json(folder / "config.json", f"the diffusers {WAN_CLASS} config")
    name = hf.get("_class_name")
    if name != WAN_CLASS:
        raise ConversionError(f"{folder / 'config.json'} is a {name!r}, not a {WAN_CLASS} "
                              "(for a Wan pipeline give its transformer/ folder)")
    unknown = sorted(k for k in hf if not k.startswith("_") and k not in _WAN_KEYS)
    if unknown:
        raise ConversionError(f"{WAN_CLASS} config keys this importer does not know: "
                              f"{unknown} (known: {sorted(_WAN_KEYS)})")
    problems = []
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if hf.get(key) is not None:
            problems.append(f"{key}={hf[key]} (image conditioning, I2V/FLF2V: only "
                            "text-to-video is supported)")
    if hf.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        problems.append(f"qk_norm={hf['qk_norm']!r} (supported: 'rms_norm_across_heads')")
    if not hf.get("cross_attn_norm", True):
        problems.append("cross_attn_norm=False (ours has the affine norm2 before the "
                        "cross-attention)")
    if hf.get("out_channels", hf.get("in_channels")) != hf.get("in_channels"):
        problems.append(f"out_channels={hf['out_channels']} != in_channels="
                        f"{hf['in_channels']} (ours predicts a velocity of the input's shape)")
    if hf.get("freq_dim", FREQUENCY_EMBEDDING_SIZE) != FREQUENCY_EMBEDDING_SIZE:
        problems.append(f"freq_dim={hf['freq_dim']} (ours embeds the time with "
                        f"{FREQUENCY_EMBEDDING_SIZE} frequencies)")
    missing = [k for k in ("patch_size", "num_attention_heads", "attention_head_dim",
                           "in_channels", "text_dim", "ffn_dim", "num_layers") if k not in hf]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise ConversionError(f"{folder / 'config.json'}: unsupported {WAN_CLASS}: "
                              + "; ".join(problems))
    return hf


def wan_sizes(hf: dict) -> dict:
    """The DiTConfig fields a Wan transformer fixes (the import checks the config keeps
    every one)."""
    heads, head_dim = hf["num_attention_heads"], hf["attention_head_dim"]
    return dict(arch="wan", pos_embed="rope", in_channels=hf["in_channels"],
                patch=list(hf["patch_size"]), hidden_size=heads * head_dim, num_heads=heads,
                depth=hf["num_layers"], ffn_dim=hf["ffn_dim"], text_dim=hf["text_dim"],
                norm_eps=float(hf.get("eps", 1e-6)), rope_theta=WAN_ROPE_THETA,
                num_classes=0, caption_dim=0)


def wan_import_config(hf: dict, preset: str | None = None, **overrides) -> DiTConfig:
    """The MHLA DiT config: `preset` + `overrides`, or without a preset the source's sizes
    + `overrides` (which must then give the clip: `frames`, `height`, `width` of the
    latents and `block_grid`). `softmax_layers="all"` keeps every self-attention softmax.
    Raises when a size the source fixes differs, naming each."""
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConversionError(f"unknown DiTConfig key(s) {unknown}; allowed: {sorted(known)}")
    source = wan_sizes(hf)
    if preset is None:
        missing = [k for k in CLIP_KEYS if k not in overrides]
        if missing:
            raise ConversionError(
                f"a Wan transformer does not fix the clip: give {', '.join(missing)} (the "
                f"latents' frames, height, width and the MHLA block grid), e.g. frames=21 "
                f"height=60 width=104 block_grid=[3,5,4], or a preset "
                f"({', '.join(DIT_PRESETS)})")
        values = {**source, "text_len": WAN_TEXT_LEN, "text_mask": False,
                  "class_dropout": 0.0, **overrides}
    elif preset not in DIT_PRESETS:
        raise ConversionError(f"preset={preset!r} is not one of {', '.join(DIT_PRESETS)}")
    else:
        values = dict(overrides)
    if values.get("softmax_layers") == "all":
        values["softmax_layers"] = list(range(source["depth"]))
    try:
        cfg = dit_config(preset, **values)
    except ValueError as exc:
        raise ConversionError(f"invalid DiT config: {exc}") from None
    differ = [f"{k}: source {v}, config {getattr(cfg, k)}" for k, v in source.items()
              if getattr(cfg, k) != v]
    if differ:
        raise ConversionError(
            f"the Wan transformer's sizes differ from the config"
            f"{f' (preset {preset!r})' if preset else ''}: {'; '.join(differ)} (pass "
            f"key=value overrides with the source's values, or another preset)")
    return cfg


def check_rope_length(hf: dict, cfg: DiTConfig) -> str:
    """Wan's rotary tables hold `rope_max_seq_len` positions per axis (ours are computed
    for the config's grid; the key is not used otherwise): the patch grid must fit."""
    limit = hf.get("rope_max_seq_len", 1024)
    grid = cfg.patch_grid
    if max(grid) > limit:
        raise ConversionError(f"patch grid {list(grid)} (frames, height, width "
                              f"{cfg.frames}x{cfg.height}x{cfg.width} / patch {cfg.patch}) "
                              f"exceeds the source's rope_max_seq_len={limit} on an axis")
    return f"patch grid {list(grid)} within rope_max_seq_len={limit}"


def _proj_out_rows(w: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """`[pt*ph*pw*C, ...]` rows in Wan's `(pt, ph, pw, C)` order -> our `(C, pt, ph, pw)`."""
    pt, ph, pw = cfg.patch
    w = w.reshape(pt, ph, pw, cfg.in_channels, *w.shape[1:])
    return w.movedim(3, 0).reshape(cfg.patch_dim, *w.shape[4:])


def _plan(cfg: DiTConfig) -> Plan:
    h, f, m, d = cfg.hidden_size, FREQUENCY_EMBEDDING_SIZE, cfg.mlp_hidden_size, cfg.text_dim
    copy = "copied"

    def linear(src: str, dst: str, out: int, inp: int) -> Plan:
        return {f"{src}.weight": ((out, inp), f"{dst}.weight", lambda w: w, copy),
                f"{src}.bias": ((out,), f"{dst}.bias", lambda w: w, copy)}

    plan: Plan = {
        "patch_embedding.weight": ((h, cfg.in_channels, *cfg.patch), "x_embedder.weight",
                                   lambda w: w.reshape(h, -1), "Conv3d [hidden, C, pt, ph, "
                                   "pw] -> linear over (C, pt, ph, pw) tokens, reshaped"),
        "patch_embedding.bias": ((h,), "x_embedder.bias", lambda w: w, copy),
        "scale_shift_table": ((1, 2, h), "head.modulation", lambda w: w,
                              "copied (shift, scale)"),
    }
    plan |= linear("condition_embedder.time_embedder.linear_1", "t_embedder.mlp.0", h, f)
    plan |= linear("condition_embedder.time_embedder.linear_2", "t_embedder.mlp.2", h, h)
    plan |= linear("condition_embedder.time_proj", "time_proj", 6 * h, h)
    plan |= linear("condition_embedder.text_embedder.linear_1", "text_embedder.linear_1", h, d)
    plan |= linear("condition_embedder.text_embedder.linear_2", "text_embedder.linear_2", h, h)
    for part, shape in (("weight", (cfg.patch_dim, h)), ("bias", (cfg.patch_dim,))):
        plan[f"proj_out.{part}"] = (shape, f"head.linear.{part}",
                                    lambda w: _proj_out_rows(w, cfg),
                                    "rows (pt, ph, pw, C) -> (C, pt, ph, pw), permuted")
    for i in range(cfg.depth):
        s = t = f"blocks.{i}."
        for src_attn, dst_attn in (("attn1", "attn"), ("attn2", "cross_attn")):
            for src_name, dst_name in (("to_q", "q_proj"), ("to_k", "k_proj"),
                                       ("to_v", "v_proj"), ("to_out.0", "o_proj")):
                plan |= linear(f"{s}{src_attn}.{src_name}", f"{t}{dst_attn}.{dst_name}", h, h)
            for norm in ("norm_q", "norm_k"):
                plan[f"{s}{src_attn}.{norm}.weight"] = (
                    (h,), f"{t}{dst_attn}.{norm}.weight", lambda w: w, copy)
        plan |= linear(f"{s}ffn.net.0.proj", f"{t}mlp.fc1", m, h)
        plan |= linear(f"{s}ffn.net.2", f"{t}mlp.fc2", h, m)
        for part in ("weight", "bias"):
            plan[f"{s}norm2.{part}"] = ((h,), f"{t}norm2.{part}", lambda w: w, copy)
        plan[f"{s}scale_shift_table"] = ((1, 6, h), f"{t}modulation", lambda w: w,
                                         "copied (same chunk order)")
    return plan


def convert_wan_state(src: dict[str, torch.Tensor], cfg: DiTConfig
                      ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map Wan tensors to the MHLA DiT's names; raises `ConversionError` naming every key
    or shape that does not fit, before anything is converted."""
    rep = ConversionReport()
    plan = _plan(cfg)
    missing = [k for k in plan if k not in src]
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} {WAN_CLASS} tensors for this "
                              f"config, e.g. {', '.join(missing[:5])} (config: hidden_size="
                              f"{cfg.hidden_size}, depth={cfg.depth})")
    unknown = [f"{k} {tuple(src[k].shape)}" for k in src if k not in plan]
    if unknown:
        raise ConversionError(f"source tensors with no place in the MHLA DiT: "
                              f"{'; '.join(unknown[:8])}")
    bad = [f"{k}: {tuple(src[k].shape)}, expected {shape}" for k, (shape, *_) in plan.items()
           if tuple(src[k].shape) != shape]
    if bad:
        raise ConversionError("source shapes do not match the config: " + "; ".join(bad[:8]))
    out: dict[str, torch.Tensor] = {}
    for key, (_, target, fn, how) in plan.items():
        out[target] = fn(src[key].float()).contiguous()
        rep.map(key, target, out[target], how)
    create_mixing(cfg, out, rep)
    check_state(out, parameter_layout(cfg), "the converted weights")
    return out, rep


def import_wan(source: str | Path, output: str | Path, *, preset: str | None = None,
               dtype: str = "fp32", **overrides) -> ConversionReport:
    """Convert a diffusers `WanTransformer3DModel` folder to consolidated MHLA DiT weights
    at `output` (+ `model_config.json` beside it and `<output>.report.json`).

    `preset` (e.g. "wan2.1-1.3b") plus DiTConfig `overrides` give the config; without a
    preset the sizes come from `config.json` and `overrides` give the clip (`frames`,
    `height`, `width`, `block_grid`). `softmax_layers=[...]` (or "all") keeps those
    self-attentions softmax."""
    folder = Path(source)
    hf = read_wan_config(folder)
    cfg = wan_import_config(hf, preset, **overrides)
    rope = check_rope_length(hf, cfg)
    src, _ = read_safetensors_source(folder)
    state, rep = convert_wan_state(src, cfg)
    softmax = len(cfg.softmax_layers)
    rep.notes += [
        f"source: {WAN_CLASS} {folder} ({math.fsum(v.numel() for v in src.values()) / 1e6:.1f}M "
        f"parameters, {', '.join(sorted({str(v.dtype) for v in src.values()}))})",
        f"clip {cfg.frames}x{cfg.height}x{cfg.width} latents, block_grid {cfg.block_grid} "
        f"({cfg.num_blocks} MHLA blocks of {cfg.block_size} tokens); {rope}",
        f"{softmax} of {cfg.depth} self-attention layers kept softmax "
        + ("(Wan itself)" if softmax == cfg.depth else "(the rest MHLA: fine-tune before use)"),
        f"text: {cfg.text_len} caption tokens, "
        + ("zero-padded and all attended, as Wan" if not cfg.text_mask else "masked padding"),
    ]
    write_consolidated(state, output, cfg, dtype=dtype, metadata={"source": str(source)})
    rep.write(Path(output).with_suffix(".report.json"))
    return rep
