"""A Llama-style softmax decoder (Hugging Face layout) -> the MHLA language model.

Projections, MLP, norms, embeddings and the head are copied exactly (HF `nn.Linear`
weights are `[out, in]`, as ours). What a softmax Llama does not have is created:

- `mixing`: the causal row average `Mc[i, b] = 1/(i+1)` (DESIGN §1), `[M, M]` (or
  repeated per head), `M = max_seq_len / block_size`.
- `out_norm`: ones (the per-head output RMSNorm; it takes the softmax denominator's
  place, since linear attention without normalisation has another output scale).
- the layers named by `softmax_layers` (`all`: every layer) stay softmax attention and get
  neither of those: importing with every layer softmax computes the source model.
- the output gate: off by default (`output_gate=False`). No linear init makes
  `silu(gate(x))` the identity (a zero gate gives `silu(0) = 0` and silences attention),
  so the closest model to the pretrained one has no gate; `output_gate=True` creates it
  at the model's own random init, to be learned while fine-tuning.

Grouped-query attention: `k_proj`/`v_proj` with `num_key_value_heads < num_attention_heads`
are expanded by repeating each key/value head for the query heads that share it (HF's
`repeat_kv` order), which computes the same keys and values. RoPE is HF's "rotate half"
form, which is the MHLA LM's `rotary`; `rotary_emb.inv_freq` buffers are dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mhla_dist.config import LMConfig
from mhla_kernels import causal_mixing

from .files import write_consolidated
from .model_spec import ConversionError, check_state, model_config_from_dict, parameter_layout
from .report import ConversionReport
from .source_files import read_json, read_safetensors_source

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def softmax_layer_list(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """`all`, a comma-separated list of layer indices, or a list -> sorted indices."""
    if spec is None or spec == "":
        return []
    if spec == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(i) for i in (spec.split(",") if isinstance(spec, str) else spec)})
    except ValueError:
        raise ConversionError(f"--softmax-layers {spec!r}: give 'all' or layer indices like "
                              "0,3") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConversionError(f"--softmax-layers {spec!r}: layers {bad} outside [0, "
                              f"{num_layers})")
    return layers


def _rope_theta(hf: dict) -> float:
    """transformers >= 5 writes `rope_parameters`; older configs `rope_theta`."""
    rope = hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ConversionError(f"rope_type {kind!r} (scaled RoPE) is not supported: the MHLA LM "
                              "has the default rotary embedding")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_lm_config(hf: dict, *, block_size: int = 64, max_seq_len: int | None = None,
                    output_gate: bool = False, feature_map: str = "relu",
                    per_head_mixing: bool = False,
                    softmax_layers: str | list[int] | None = None) -> LMConfig:
    """The MHLA LM config for an HF Llama `config.json` mapping. `softmax_layers`: the
    layers that stay softmax attention (`all` or indices), without the MHLA extras (output
    norm, gate) there, so that `all` computes the source model itself."""
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size")
    missing = [k for k in need if k not in hf]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)} (not a Llama config?)")
    heads = hf["num_attention_heads"]
    softmax = softmax_layer_list(softmax_layers, hf["num_hidden_layers"])
    return model_config_from_dict(dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
        block_size=block_size, feature_map=feature_map, normalize=False, output_norm=True,
        output_gate=output_gate, rotary=True, rope_theta=_rope_theta(hf),
        per_head_mixing=per_head_mixing, tie_embeddings=bool(hf.get("tie_word_embeddings",
                                                                      False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), softmax_layers=softmax,
        softmax_layer_extras=False))


def _expand_kv(w: torch.Tensor, kv_heads: int, heads: int, head_dim: int) -> torch.Tensor:
    """`[kv_heads*d, hidden]` -> `[heads*d, hidden]`, query head j reading kv head
    j // (heads // kv_heads) (HF `repeat_kv`)."""
    return w.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, 0).reshape(
        heads * head_dim, -1)


def convert_llama_state(src: dict[str, torch.Tensor], hf: dict, cfg: LMConfig
                        ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map HF tensors to the MHLA LM's names; raises `ConversionError` on any key or shape
    that does not fit, before anything is written."""
    rep, out, used = ConversionReport(), {}, set()
    h, heads, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConversionError(f"num_key_value_heads={kv_heads} does not divide "
                              f"num_attention_heads={heads}")
    expect = {"model.embed_tokens.weight": ("embed.weight", (cfg.vocab_size, h)),
              "model.norm.weight": ("norm.weight", (h,))}
    if not cfg.tie_embeddings:
        expect["lm_head.weight"] = ("head.weight", (cfg.vocab_size, h))
    for i in range(cfg.num_layers):
        s, t = f"model.layers.{i}.", f"layers.{i}."
        shapes = {"q_proj": (heads * d, h), "k_proj": (kv_heads * d, h),
                  "v_proj": (kv_heads * d, h), "o_proj": (h, heads * d)}
        for p in _PROJ:
            expect[f"{s}self_attn.{p}.weight"] = (f"{t}attn.{p}.weight", shapes[p])
        for p, shape in zip(_MLP, ((cfg.ffn_hidden_size, h),) * 2 + ((h, cfg.ffn_hidden_size),),
                            strict=True):
            expect[f"{s}mlp.{p}.weight"] = (f"{t}mlp.{p}.weight", shape)
        expect[f"{s}input_layernorm.weight"] = (f"{t}attn_norm.weight", (h,))
        expect[f"{s}post_attention_layernorm.weight"] = (f"{t}mlp_norm.weight", (h,))
    missing = [k for k in expect if k not in src]
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} Llama tensors, e.g. "
                              f"{', '.join(missing[:5])} (keys found: "
                              f"{', '.join(sorted(src)[:5])} ...)")
    bad = [f"{k}: {tuple(src[k].shape)}, expected {shape}" for k, (_, shape) in expect.items()
           if tuple(src[k].shape) != shape]
    if bad:
        raise ConversionError("source shapes do not match config.json: " + "; ".join(bad[:8]))
    for key, (target, _) in expect.items():
        w = src[key].float()
        how = "copied"
        if kv_heads != heads and key.endswith(("k_proj.weight", "v_proj.weight")):
            w = _expand_kv(w, kv_heads, heads, d)
            how = f"GQA: {kv_heads} heads repeated x{heads // kv_heads}"
        out[target] = w.contiguous()
        rep.map(key, target, w, how)
        used.add(key)
    for key in src:
        if key in used:
            continue
        if key.endswith("rotary_emb.inv_freq"):
            rep.drop(key, "RoPE frequencies are recomputed from rope_theta")
        elif key == "lm_head.weight" and cfg.tie_embeddings:
            rep.drop(key, "tie_word_embeddings: the head is the embedding")
        else:
            raise ConversionError(f"source tensor {key} {tuple(src[key].shape)} has no place "
                                  "in the MHLA LM (biases and other extras are not supported)")
    if kv_heads != heads:
        rep.notes.append(f"GQA: k/v projections expanded from {kv_heads} to {heads} heads")
    _create_lm_extras(out, cfg, rep)
    check_state(out, parameter_layout(cfg), "the converted weights")
    return out, rep


def _create_lm_extras(out: dict, cfg: LMConfig, rep: ConversionReport) -> None:
    mixing = causal_mixing(cfg.num_blocks)
    if cfg.per_head_mixing:
        mixing = mixing.expand(cfg.num_heads, -1, -1).clone()
    for i in range(cfg.num_layers):
        t = f"layers.{i}.attn."
        if i in cfg.softmax_layers:
            continue
        out[t + "mixing"] = mixing.clone()
        rep.create(t + "mixing", mixing, f"causal row average over M={cfg.num_blocks} blocks")
    for i in range(cfg.num_layers):
        t = f"layers.{i}.attn."
        if i in cfg.softmax_layers and not cfg.softmax_layer_extras:
            continue  # a plain softmax layer, as in the source
        if cfg.output_norm:
            out[t + "out_norm"] = torch.ones(cfg.head_dim)
            rep.create(t + "out_norm", out[t + "out_norm"], "ones")
        if cfg.output_gate:
            w = torch.randn(cfg.num_heads * cfg.head_dim, cfg.hidden_size) * cfg.hidden_size**-0.5
            out[t + "gate_proj.weight"] = w
            rep.create(t + "gate_proj.weight", w, "normal(0, hidden**-0.5), to be learned")


def import_llama(source: str | Path, output: str | Path, *, hf_config: str | Path | None = None,
                 dtype: str = "fp32", **options) -> ConversionReport:
    """Convert an HF Llama checkpoint (a safetensors file or folder, `config.json` beside
    it or at `hf_config`) to consolidated MHLA LM weights at `output`; `options` go to
    `llama_lm_config`. Writes the report as `<output>.report.json` too."""
    src, folder = read_safetensors_source(source)
    hf = read_json(Path(hf_config) if hf_config else folder / "config.json", "HF config")
    cfg = llama_lm_config(hf, **options)
    state, rep = convert_llama_state(src, hf, cfg)
    write_consolidated(state, output, cfg, dtype=dtype, metadata={"source": str(source)})
    rep.write(Path(output).with_suffix(".report.json"))
    return rep
