"""import-llama: a random HF-layout Llama (GQA) imports with its projections equal to the
source tensors, runs a finite forward, and bad sources fail before writing anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.import_llama import import_llama
from mhla_dist.convert.model_spec import ConversionError, build_model, single_rank_groups

HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 50,
      "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 64,
      "rope_theta": 10000.0}


def hf_llama(folder, hf=HF, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, ffn, d = hf["hidden_size"], hf["intermediate_size"], 8
    kv = hf["num_key_value_heads"] * d
    s = {"model.embed_tokens.weight": (hf["vocab_size"], h), "model.norm.weight": (h,),
         "lm_head.weight": (hf["vocab_size"], h)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
              p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
              p + "mlp.down_proj.weight": (h, ffn), p + "input_layernorm.weight": (h,),
              p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.rotary_emb.inv_freq": (d // 2,)}
    tensors = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in s.items()}
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    return tensors


def test_projections_equal_the_source_and_forward_is_finite(tmp_path):
    src = hf_llama(tmp_path / "hf")
    rep = import_llama(tmp_path / "hf", tmp_path / "mhla.safetensors", block_size=16)
    state, cfg = read_consolidated(tmp_path / "mhla.safetensors")
    assert cfg.rotary and cfg.num_blocks == 4 and not cfg.tie_embeddings
    for i in range(2):
        for p in ("q_proj", "o_proj"):
            assert torch.equal(state[f"layers.{i}.attn.{p}.weight"],
                               src[f"model.layers.{i}.self_attn.{p}.weight"])
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(state[f"layers.{i}.mlp.{p}.weight"],
                               src[f"model.layers.{i}.mlp.{p}.weight"])
        k = src[f"model.layers.{i}.self_attn.k_proj.weight"].view(2, 8, 32)
        # GQA: query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
        assert torch.equal(state[f"layers.{i}.attn.k_proj.weight"].view(4, 8, 32)[1], k[0])
        assert torch.equal(state[f"layers.{i}.attn.k_proj.weight"].view(4, 8, 32)[2], k[1])
    assert torch.equal(state["embed.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(state["head.weight"], src["lm_head.weight"])
    created = {c["target"] for c in rep.created}
    assert "layers.0.attn.mixing" in created and "layers.1.attn.out_norm" in created
    assert len(rep.mapped) == 2 * 9 + 3
    assert {d["source"] for d in rep.dropped} == {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    assert (tmp_path / "mhla.report.json").is_file()
    with single_rank_groups() as g:
        model = build_model(cfg, tp_group=g, cp_group=g)
        model.load_state_dict(state)
        logits = model(torch.randint(0, 50, (2, 64)))
    assert logits.shape == (2, 64, 50) and torch.isfinite(logits).all()


def test_missing_key_fails_and_writes_nothing(tmp_path):
    src = hf_llama(tmp_path / "hf")
    del src["model.layers.1.mlp.up_proj.weight"]
    save_file(src, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match=r"lacks 1 Llama tensors.*layers\.1\.mlp\.up_proj"):
        import_llama(tmp_path / "hf", tmp_path / "out" / "m.safetensors", block_size=16)
    assert not any((tmp_path / "out").iterdir())


def test_shapes_that_disagree_with_the_config_fail(tmp_path):
    hf_llama(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(HF | {"intermediate_size": 96}))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj.weight: \(64, 32\), expected "
                                              r"\(96, 32\)"):
        import_llama(tmp_path / "hf", tmp_path / "m.safetensors", block_size=16)
    assert not (tmp_path / "m.safetensors").exists()


def test_unknown_tensors_and_missing_config_are_refused(tmp_path):
    src = hf_llama(tmp_path / "hf")
    src["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(src, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match="q_proj.bias.*no place"):
        import_llama(tmp_path / "hf", tmp_path / "m.safetensors", block_size=16)
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json does not exist"):
        import_llama(tmp_path / "hf", tmp_path / "m.safetensors", block_size=16)
