"""Weight decay only on the matrices: norms, biases and Mc are exempt, in the groups the
trainer hands DeepSpeed and in the engine's optimizer; after a resume the config's weight
decay, betas and eps apply, not the checkpoint's."""

from __future__ import annotations

import torch

from mhla_dist.config import load_config
from mhla_dist.convert.model_spec import build_model, single_rank_groups
from mhla_dist.train.param_groups import apply_hyperparameters, param_groups
from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_RUN, corpus


def test_groups_of_the_lm():
    cfg = load_config(None, TINY_RUN + ["model.tie_embeddings=false"])
    with single_rank_groups() as g:
        model = build_model(cfg.model, tp_group=g, cp_group=g)
    decay, other = param_groups(model, 0.1, ["mixing"])
    assert (decay["weight_decay"], other["weight_decay"]) == (0.1, 0.0)
    assert all(".mixing" in n or n.endswith("norm.weight") or n.endswith("out_norm")
               for n in other["names"]), other["names"]
    assert "layers.0.attn.mixing" in other["names"] and "norm.weight" in other["names"]
    assert "layers.0.attn.q_proj.weight" in decay["names"] and "embed.weight" in decay["names"]
    assert len(decay["names"]) + len(other["names"]) == len(list(model.parameters()))
    # nothing exempt by name: Mc is decayed like the other matrices
    decay, _ = param_groups(model, 0.1, [])
    assert "layers.0.attn.mixing" in decay["names"]


def test_apply_hyperparameters_restores_the_config_values():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.5},
                             {"params": [b], "weight_decay": 0.5}], betas=(0.8, 0.9), eps=1e-5)
    apply_hyperparameters(opt, [{"weight_decay": 0.1}, {"weight_decay": 0.0}], [0.9, 0.95], 1e-8)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [
        (0.1, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)]


def _engine_groups_rank_fn(rank, world, overrides):
    from mhla_dist.train import Trainer

    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    trainer.train()
    return [(g["weight_decay"], g["eps"]) for g in trainer.engine.optimizer.param_groups]


def test_engine_groups_under_zero2_and_after_a_resume(tmp_path):
    data = corpus(tmp_path)
    run = [f"run_dir={tmp_path / 'run'}", "parallel.cp=2", "zero.stage=2", "train.steps=2",
           *data]
    assert run_ranks(_engine_groups_rank_fn, 2, run)[0] == [(0.1, 1e-8), (0.0, 1e-8)]
    # resumed with another weight decay and eps: the config's, not the checkpoint's
    resumed = run_ranks(_engine_groups_rank_fn, 2, run[:-len(data)] + [
        "train.steps=3", "optim.weight_decay=0.05", "optim.eps=1e-6", *data])[0]
    assert resumed == [(0.05, 1e-6), (0.0, 1e-6)]


def test_mixing_group_of_its_own_when_its_lr_is_scaled():
    cfg = load_config(None, TINY_RUN)
    with single_rank_groups() as g:
        model = build_model(cfg.model, tp_group=g, cp_group=g)
    groups = param_groups(model, 0.1, ["mixing"], mixing_lr_scale=0.5)
    assert [gr["lr_scale"] for gr in groups] == [1.0, 1.0, 0.5]
    assert groups[2]["names"] == [f"layers.{i}.attn.mixing" for i in range(2)]
    assert groups[2]["weight_decay"] == 0.0
    assert not any("mixing" in n for gr in groups[:2] for n in gr["names"])
    # The default keeps the two groups of older checkpoints.
    assert len(param_groups(model, 0.1, ["mixing"])) == 2


def _frozen_mixing_rank_fn(rank, world, overrides):
    from mhla_dist.train import Trainer

    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    module = trainer.engine.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    lrs = [g["lr"] for g in trainer.engine.optimizer.param_groups]
    return before, after, lrs


def test_mixing_lr_scale_zero_freezes_an_identity_mc_under_zero2(tmp_path):
    """`model.mixing_init=identity optim.mixing_lr_scale=0`: block-local linear attention,
    Mc never moves while every other weight trains; the group's lr is scaled."""
    run = [f"run_dir={tmp_path / 'run'}", "zero.stage=2", "train.steps=3",
           "schedule.kind=constant", "optim.lr=1e-3", "model.mixing_init=identity",
           "optim.mixing_lr_scale=0", *corpus(tmp_path)]
    before, after, lrs = run_ranks(_frozen_mixing_rank_fn, 1, run)[0]
    assert lrs == [1e-3, 1e-3, 0.0]
    for name in ("layers.0.attn.mixing", "layers.1.attn.mixing"):
        m = before[name].shape[-1]
        assert torch.equal(before[name], torch.eye(m)) and torch.equal(after[name], before[name])
    assert not torch.equal(after["layers.0.attn.q_proj.weight"],
                           before["layers.0.attn.q_proj.weight"])
