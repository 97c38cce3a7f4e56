"""export-hf: an MHLA LM written as a transformers folder loads with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, and its logits equal our
model's (MHLA and hybrid layers, per-head or shared Mc, normalised or not, tied or untied,
a ragged last block); greedy `generate()` equals ours token for token, decoding one token
per step from the recurrent state; large weights are
sharded with an index; a trained TP = 2 run (padded vocabulary) exports its real rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from mhla_dist.config import LMConfig
from mhla_dist.convert.files import write_consolidated
from mhla_dist.convert.model_spec import ConversionError, build_model, single_rank_groups
from mhla_dist.parallel.tp_state import full_state_dict, load_full_state_dict
from tests.train.launching import ROOT, launch_env

VARIANTS = {
    "hybrid-untied": dict(softmax_layers=[1], tie_embeddings=False, per_head_mixing=True),
    "normalized-elu-tied": dict(normalize=True, feature_map="elu", output_gate=False),
}


@pytest.fixture
def group():
    with single_rank_groups() as g:
        yield g


def _model(group, **overrides):
    cfg = LMConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64,
                   block_size=16, rotary=not overrides.get("normalize", False), **overrides)
    torch.manual_seed(0)
    model = build_model(cfg, tp_group=group, cp_group=group).eval()
    with torch.no_grad():  # move every weight (and Mc) away from its init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, full_state_dict(model, group)


def _export(source, out, *extra):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "export-hf",
                           str(source), str(out), *extra], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_generation_equal_ours(tmp_path, group, variant):
    ours, state = _model(group, **VARIANTS[variant])
    write_consolidated(state, tmp_path / "lm.safetensors", ours.cfg)
    _export(tmp_path / "lm.safetensors", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mhla_lm" and config["max_position_embeddings"] == 64
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhla.MHLAForCausalLM"
    hf = _load(tmp_path / "hf")
    tokens = torch.randint(0, 61, (2, 45), generator=torch.Generator().manual_seed(1))
    fed = []  # the tokens each forward call of generate() gets
    hf.register_forward_pre_hook(
        lambda m, args, kw: fed.append((args[0] if args else kw["input_ids"]).shape[1]),
        with_kwargs=True)
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for prompt in (7, 16):  # a prompt ending inside a block, and one filling it
            fed.clear()
            want_gen = ours.generate(tokens[:1, :prompt], 20, temperature=0)
            got_gen = hf.generate(tokens[:1, :prompt], max_new_tokens=20, do_sample=False)
            assert torch.equal(got_gen, want_gen), prompt
            assert fed == [prompt] + [1] * 19  # the prefix once, then the recurrent state


def test_weights_past_the_limit_are_sharded_with_an_index(tmp_path, group):
    ours, state = _model(group, softmax_layers=[0])
    write_consolidated(state, tmp_path / "lm.safetensors", ours.cfg)
    _export(tmp_path / "lm.safetensors", tmp_path / "hf", "--shard-gb", str(20_000 / 2**30))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(state)
    tokens = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "hf")(tokens).logits, ours(tokens),
                                   rtol=1e-5, atol=1e-5)


def test_a_tp2_run_exports_its_real_vocabulary(trained, tmp_path, group):
    """The TP = 2 ZeRO-3 checkpoint holds 129 + 129 embedding rows; the export 257."""
    from mhla_dist.convert.zero import consolidate_zero_checkpoint

    _export(trained["tp2"], tmp_path / "hf")
    state, cfg = consolidate_zero_checkpoint(trained["tp2"] / "checkpoints")
    hf = _load(tmp_path / "hf")
    assert hf.embed.weight.shape == (257, cfg.hidden_size)
    tokens = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(3))
    ours = build_model(cfg, tp_group=group, cp_group=group).eval()
    load_full_state_dict(ours, state, group)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


def test_bad_sources_and_targets_fail_clearly(tmp_path, group):
    from mhla_dist.convert.export_hf import export_hf

    ours, state = _model(group)
    write_consolidated(state, tmp_path / "lm.safetensors", ours.cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConversionError, match="is not empty"):
        export_hf(tmp_path / "lm.safetensors", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ConversionError, match="neither a .safetensors"):
        export_hf(tmp_path / "missing.pt", tmp_path / "out")


def test_the_byte_tokenizer_loads_with_auto_tokenizer(trained, tmp_path):
    """A 257-token run exports mhla-dist's byte-level tokenizer: ids are the UTF-8 bytes,
    256 is the end of a document, and text round-trips."""
    from mhla_dist.data.tokenizer import ByteTokenizer

    _export(trained["tp1"], tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "MHLA says héllo, 世界!"
    ids = tok(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tok.decode(ids) == text and tok.eos_token_id == 256
