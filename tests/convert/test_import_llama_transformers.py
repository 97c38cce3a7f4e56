"""import-llama against transformers itself: a tiny random `LlamaForCausalLM` (GQA, untied
head, a non-default RoPE theta in transformers 5's `rope_parameters`) built and saved by
transformers, imported through the CLI with every layer softmax, gives transformers'
logits; imported as a hybrid, it trains through `python -m mhla_dist.train` from
`init.weights=` and exports back with `export-hf` (transformers loads it, same logits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers  # a dev extra (pyproject.toml): this test is what it is there for

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.model_spec import build_model, single_rank_groups
from mhla_dist.parallel.tp_state import load_full_state_dict
from tests.train.launching import ROOT, launch_env


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    cfg = transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_theta"] \
        == 500.0
    return folder, model


def _import(folder, out, *extra):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "import-llama",
                           str(folder), str(out), "--block-size", "16", *extra], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return read_consolidated(out)


def test_every_layer_softmax_gives_transformers_logits(hf_llama, tmp_path):
    folder, hf = hf_llama
    state, cfg = _import(folder, tmp_path / "softmax.safetensors", "--softmax-layers", "all")
    assert cfg.softmax_layers == [0, 1] and not cfg.softmax_layer_extras
    assert not any("out_norm" in k or "mixing" in k for k in state)
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with single_rank_groups() as group:
        ours = build_model(cfg, tp_group=group, cp_group=group).eval()
        load_full_state_dict(ours, state, group)
        with torch.no_grad():
            got = ours(tokens)
    with torch.no_grad():
        want = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_imported_hybrid_trains_from_init_weights(hf_llama, tmp_path):
    folder, _ = hf_llama
    weights = tmp_path / "hybrid.safetensors"
    _, cfg = _import(folder, weights, "--softmax-layers", "1")
    assert cfg.softmax_layers == [1]
    from mhla_dist.data import build_default_corpus

    corpus = build_default_corpus(tmp_path / "corpus", docs_per_shard=8)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mhla_dist.train", "--config", "configs/lm/tiny.yaml",
         f"run_dir={run}", f"init.weights={weights}",
         "model.vocab_size=257", "model.hidden_size=32", "model.num_layers=2",
         "model.num_heads=4", "model.head_dim=8", "model.ffn_hidden_size=64",
         "model.max_seq_len=64", "model.block_size=16", "model.rotary=true",
         "model.rope_theta=500.0", "model.output_gate=false", "model.tie_embeddings=false",
         "model.norm_eps=1e-6", "model.softmax_layers=[1]", "model.softmax_layer_extras=false",
         f"data.train={corpus.train}", "train.steps=4", "logging.interval=1",
         "logging.wandb.mode=disabled", "optim.lr=1e-3"],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # ... and goes back to transformers with export-hf
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "export-hf", str(run),
                           str(tmp_path / "back")], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back",
                                                             trust_remote_code=True).eval()
    state, trained_cfg = read_consolidated(run / "model.safetensors")
    tokens = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(2))
    with single_rank_groups() as group:
        ours = build_model(trained_cfg, tp_group=group, cp_group=group).eval()
        load_full_state_dict(ours, state, group)
        with torch.no_grad():
            torch.testing.assert_close(back(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
