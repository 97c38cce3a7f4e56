"""lm-evaluation-harness on an exported model, offline: `lm_eval --model hf` runs a local
multiple-choice task (tests/convert/lm_eval_task/) on the `export-hf` folder, and its
`HFLM` wrapper's loglikelihoods equal our model's own log-probabilities."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mhla_dist.config import LMConfig
from mhla_dist.convert.export_hf import export_hf
from mhla_dist.convert.files import write_consolidated
from mhla_dist.convert.model_spec import build_model, single_rank_groups
from mhla_dist.data.tokenizer import ByteTokenizer
from mhla_dist.parallel.tp_state import full_state_dict
from tests.train.launching import ROOT, launch_env

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny hybrid byte-level LM (vocab 257), exported; and our model itself."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    cfg = LMConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64,
                   block_size=16, rotary=True, softmax_layers=[1])
    with single_rank_groups() as group:
        torch.manual_seed(0)
        model = build_model(cfg, tp_group=group, cp_group=group).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        write_consolidated(full_state_dict(model, group), tmp / "lm.safetensors", model.cfg)
        export_hf(tmp / "lm.safetensors", tmp / "hf")
        yield tmp / "hf", model


def test_lm_eval_cli_runs_a_local_task(exported, tmp_path):
    folder, _ = exported
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks",
         "mhla_tiny_choice", "--include_path", "tests/convert/lm_eval_task", "--device", "cpu",
         "--batch_size", "1", "--output_path", str(tmp_path / "out")],
        cwd=ROOT, env=launch_env(**OFFLINE), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("out/**/results_*.json")
    acc = json.loads(results.read_text())["results"]["mhla_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_hflm_loglikelihood_equals_our_log_probabilities(exported, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    folder, ours = exported
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", batch_size=1,
              device="cpu")
    pairs = [("The cat sat on the", " mat"), ("Water is", " wet, mostly")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i)
                            for i, pair in enumerate(pairs)], disable_tqdm=True)
    tok = ByteTokenizer()
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        ctx, cont = tok.encode(context).tolist(), tok.encode(continuation).tolist()
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = ours(ids[:, :-1]).log_softmax(-1)[0, len(ctx) - 1:]
        want = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(logprob - want) < 1e-4, (context, logprob, want)
