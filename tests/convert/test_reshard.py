"""Consolidated weights -> training at another layout (init.weights) -> consolidated again
is exact; a file for another model, a carried optimizer from a file and a resume at
another layout without conversion fail clearly."""

from __future__ import annotations

import logging

import pytest
import torch

from mhla_dist.config import ConfigError, load_config
from mhla_dist.convert.files import read_consolidated, write_consolidated
from mhla_dist.convert.model_spec import ConversionError
from mhla_dist.convert.reshard import check_resume_layout
from mhla_dist.convert.zero import consolidate_zero_checkpoint, zero_to_safetensors
from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_RUN


def init_and_save_rank_fn(rank, world, overrides):
    """Build the trainer (which loads init.weights), save a checkpoint at step 0."""
    from mhla_dist.train import Trainer

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("mhla_dist.train").addHandler(handler)
    logging.getLogger("mhla_dist.train").setLevel(logging.INFO)
    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    trainer.save()
    return records


def test_round_trip_through_another_layout_is_exact(trained, tmp_path):
    """TP = 2 ZeRO-3 -> file -> CP = 2 ZeRO-1 run -> its checkpoint -> file: equal bits."""
    source = zero_to_safetensors(trained["tp2"], tmp_path / "a.safetensors")
    run = [f"run_dir={tmp_path / 'cp2'}", "parallel.cp=2", "zero.stage=1",
           f"init.weights={source}", *trained["data"]]
    logs = run_ranks(init_and_save_rank_fn, 2, run)[0]
    assert any("optimizer state reset" in m for m in logs), logs
    again, _ = consolidate_zero_checkpoint(tmp_path / "cp2")
    first, _ = read_consolidated(source)
    assert again.keys() == first.keys()
    for name, t in first.items():
        assert torch.equal(again[name], t), name


def test_weights_for_another_model_are_refused(trained, tmp_path):
    from mhla_dist.convert.reshard import load_consolidated_weights

    state, cfg = consolidate_zero_checkpoint(trained["tp2"])
    bad = dict(state)
    bad["embed.weight"] = torch.zeros(100, 32)
    path = write_consolidated(bad, tmp_path / "bad.safetensors", None)
    from mhla_dist.convert.model_spec import build_model, single_rank_groups

    with single_rank_groups() as g:
        model = build_model(cfg, tp_group=g, cp_group=g)
        with pytest.raises(ConversionError, match=r"embed.weight has shape \(100, 32\)"):
            load_consolidated_weights(model, path, g, cfg)


def test_carrying_the_optimizer_from_a_file_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="init.optimizer='carry'.*holds no optimizer state"):
        load_config(None, ["init.weights=x.safetensors", "init.optimizer=carry"])
    with pytest.raises(ConfigError, match="init.optimizer='keep' must be one of auto, carry"):
        load_config(None, ["init.optimizer=keep"])
    load_config(None, ["init.weights=ckpt/step1", "init.optimizer=carry"])  # a folder: fine


def test_resume_at_another_layout_says_how_to_convert(trained):
    folder = trained["tp2"] / "checkpoints" / "step00000002"
    check_resume_layout(folder, tp=2, dp_cp=1)
    with pytest.raises(ConversionError, match="tp=2.*to-universal .*step00000002 NEW_FOLDER"):
        check_resume_layout(folder, tp=1, dp_cp=2)
