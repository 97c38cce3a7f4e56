"""A tiny LM run directory as training leaves it (config.yaml, model.safetensors), with
random weights and held-out shards of short documents (pieces of the embedded corpus, 10
to 150 bytes, so that windows hold several documents) as its data.eval: what
tools/eval_lm.py loads, without spending the seconds a trainer run costs."""

from __future__ import annotations

from pathlib import Path

import torch

from mhla_dist.eval.runs import load_lm, read_lm_config, single_process
from tests.train.runs import TINY_RUN, short_documents

# 128 tokens: room for a passkey trial (104 tokens without filler); rotary so that the
# per-document positions reach the model too.
LM_RUN = [*TINY_RUN, "model.max_seq_len=128", "model.block_size=16", "model.rotary=true"]


def make_lm_run(run_dir: Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from mhla_dist.config import config_to_yaml, load_config
    from mhla_dist.model.lm import MHLALanguageModel
    from tests.model.dit_helpers import perturb

    data = short_documents(run_dir.parent / f"{run_dir.name}-data")
    cfg = load_config(None, LM_RUN + [f"run_dir={run_dir}", f"data.train={data}",
                                      f"data.eval={data}", *(overrides or [])])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    with single_process():
        torch.manual_seed(seed)
        model = MHLALanguageModel(cfg.model)
        perturb(model, seed=seed + 1, scale=0.3)  # losses that differ from token to token
        # the parameters, as the trainer's consolidated file holds them
        save_file({k: p.detach().contiguous() for k, p in model.named_parameters()},
                  str(run_dir / "model.safetensors"))
    return run_dir


def load_run_model(run_dir: Path):
    """The run's model, loaded the way tools/eval_lm.py does (inside `single_process`)."""
    return load_lm(run_dir, read_lm_config(run_dir))
