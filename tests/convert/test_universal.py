"""Carrying the optimizer state to another layout through DeepSpeed's universal
checkpoint: the converted state is the source's (weights equal the consolidated ones;
Adam's moments equal, within fp32 rounding, those of the same run on one process); a run
resumed from it at another DP x CP x TP layout and ZeRO stage continues exactly like the
source run resumed at its own layout, and resetting the optimizer instead does not;
loading puts every moment where it belongs; bad inputs fail before writing."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mhla_dist.config import load_config
from mhla_dist.convert.inspection import describe
from mhla_dist.convert.model_spec import ConversionError
from mhla_dist.convert.universal import (
    read_universal_weights,
    to_universal,
    universal_source,
    universal_state,
)
from mhla_dist.convert.zero import consolidate_zero_checkpoint
from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_DIT_RUN, TINY_RUN, clips, train_rank_fn
from tools.convert_checkpoint import main as convert_main

from .conftest import STEPS
from .test_zero import RTOL, rel

MORE = ["train.steps=4", "optim.eps=1e-3"]  # 2 steps after the saved step 2


def _tag(run):
    return run / "checkpoints" / "step00000002"


@pytest.fixture(scope="session")
def universal(trained, tmp_path_factory):
    """The TP = 2 ZeRO-3 run and the single-process ZeRO-3 run, converted; plus a CP = 2
    ZeRO-2 run (2 ranks, each holding half of the optimizer state), converted."""
    tmp = tmp_path_factory.mktemp("universal")
    cp2 = tmp / "cp2z2"
    run_ranks(train_rank_fn, 2, [f"run_dir={cp2}", "parallel.cp=2", "zero.stage=2", *STEPS,
                                 *trained["data"]])
    assert convert_main(["to-universal", str(trained["tp2"]), str(tmp / "tp2_uni")]) == 0
    return {"tp2": tmp / "tp2_uni", "tp1": to_universal(trained["tp1"], tmp / "tp1_uni"),
            "cp2z2_run": cp2, "cp2z2": to_universal(cp2, tmp / "cp2z2_uni")}


def test_universal_state_is_the_source_state(trained, universal):
    weights = read_universal_weights(universal["tp2"])
    consolidated, _ = consolidate_zero_checkpoint(trained["tp2"])
    assert weights.keys() == consolidated.keys()
    for name, t in consolidated.items():
        assert torch.equal(weights[name], t), name
    # Adam's moments of the TP = 2 run, merged over TP, against the single-process run's
    for key in ("exp_avg", "exp_avg_sq"):
        tp2, tp1 = (universal_state(universal[k], key) for k in ("tp2", "tp1"))
        assert tp2.keys() == consolidated.keys() == tp1.keys()
        for name, ref in tp1.items():
            assert ref.abs().max() > 0, (key, name)  # two steps moved every moment
            assert rel(tp2[name], ref) <= 10 * RTOL, (key, name, rel(tp2[name], ref))
    text = describe(universal["tp2"])
    assert "universal checkpoint" in text and "ZeRO 3" in text and "43,264" in text
    src = universal_source(universal["tp2"])
    assert (src["tp"], src["dp_cp"], src["zero_stage"]) == (2, 1, 3)
    assert universal_source(universal["cp2z2"])["dp_cp"] == 2


def _continue_rank_fn(rank, world, overrides, base=None):
    """Train `overrides` over the tiny LM; returns rank 0's losses and start log line."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("mhla_dist.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    result = train_rank_fn(rank, world, overrides, base=base)
    return {"losses": [row["loss"] for row in result["rows"]],
            "log": [m for m in records if "optimizer state" in m]}


def _continue(run_dir, world, *overrides, base=None):
    out = run_ranks(_continue_rank_fn, world, [f"run_dir={run_dir}", *MORE, *overrides],
                    base)[0]
    return out, load_file(str(run_dir / "model.safetensors"))


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_at_another_layout_continues_like_the_saved_layout(trained, universal,
                                                                  tmp_path):
    """TP = 2 ZeRO-3 -> universal -> CP = 2 ZeRO-1 for 2 more steps, against the source
    resumed at TP = 2 ZeRO-3; with the optimizer reset instead, the weights part."""
    data = trained["data"]
    _, native = _continue(tmp_path / "native", 2, f"resume={_tag(trained['tp2'])}",
                          "parallel.tp=2", "zero.stage=3", *data)
    moved, carried = _continue(tmp_path / "carried", 2, f"resume={universal['tp2']}",
                               "parallel.cp=2", "zero.stage=1", *data)
    reset_out, reset = _continue(tmp_path / "reset", 2, f"resume={universal['tp2']}",
                                 "init.optimizer=reset", "parallel.cp=2", "zero.stage=1",
                                 *data)
    assert _max_rel(carried, native) <= 1e-6, _max_rel(carried, native)
    assert _max_rel(reset, native) >= 1e-3  # the carried moments are what made it equal
    assert "universal, saved at tp=2, dp x cp=1) at tp=1 cp=2 dp=1; optimizer state " \
           "carried over" in moved["log"][0]
    assert reset_out["log"][0].endswith("optimizer state reset")


@pytest.fixture(scope="session")
def cp2z2_native(trained, universal, tmp_path_factory):
    """The CP = 2 ZeRO-2 run resumed at its own layout for 2 more steps."""
    run = tmp_path_factory.mktemp("native") / "run"
    return _continue(run, 2, f"resume={_tag(universal['cp2z2_run'])}", "parallel.cp=2",
                     "zero.stage=2", *trained["data"])[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 1])
def test_zero2_state_split_over_two_ranks_resumes_at_tp2(trained, universal, cp2z2_native,
                                                          tmp_path, stage):
    """CP = 2 ZeRO-2 (each rank holds half the moments) -> universal -> TP = 2 at ZeRO-3
    (DeepSpeed slices TP through its AutoTP metadata, `start._zero3_tp_slicing`) and at
    ZeRO-1 (its cat_dim path): both continue like the source."""
    _, carried = _continue(tmp_path / "carried", 2, f"resume={universal['cp2z2']}",
                           "parallel.tp=2", f"zero.stage={stage}", *trained["data"])
    assert _max_rel(carried, cp2z2_native) <= 1e-6, _max_rel(carried, cp2z2_native)


@pytest.mark.slow
def test_dit_moves_from_cp2_zero2_to_tp2_zero3(tmp_path):
    """The DiT's split parameters (adaLN, patch embedding, attention, MLP) too."""
    data = clips(tmp_path)
    src = tmp_path / "src"
    run_ranks(train_rank_fn, 2, [f"run_dir={src}", "parallel.cp=2", "zero.stage=2", *STEPS,
                                 *data], None, TINY_DIT_RUN)
    uni = to_universal(src, tmp_path / "uni")
    _, native = _continue(tmp_path / "native", 2, f"resume={_tag(src)}", "parallel.cp=2",
                          "zero.stage=2", *data, base=TINY_DIT_RUN)
    _, carried = _continue(tmp_path / "carried", 2, f"resume={uni}", "parallel.tp=2",
                           "zero.stage=3", *data, base=TINY_DIT_RUN)
    _, reset = _continue(tmp_path / "reset", 2, f"resume={uni}", "parallel.tp=2",
                         "zero.stage=3", "init.optimizer=reset", *data, base=TINY_DIT_RUN)
    assert _max_rel(carried, native) <= 1e-6, _max_rel(carried, native)
    assert _max_rel(reset, native) >= 1e-3


def _loaded_moments_rank_fn(rank, world, overrides, train=False):
    """Build the trainer (loading init.weights with its optimizer; with `train`, then
    train); every parameter's full moments and master weight as the engine holds them,
    TP-gathered."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mhla_dist.parallel.tp_state import gather_tp_tensors
    from mhla_dist.train import Trainer

    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    if train:
        trainer.train()
        # DeepSpeed 0.19's ZeRO-1/2 links the moments to each parameter after the first
        # group's first step, before the other groups have any: link them again.
        opt = trainer.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
    module = trainer.engine.module
    out = {}
    for key in ("exp_avg", "exp_avg_sq", "fp32"):
        local = {n: (safe_get_full_fp32_param(p) if key == "fp32"
                     else safe_get_full_optimizer_state(p, key))
                 for n, p in module.named_parameters()}
        out[key] = gather_tp_tensors(module, local, trainer.topo.tp_group)
    out["step"] = trainer.step
    return out


@pytest.mark.slow
def test_init_carry_puts_every_moment_in_place(trained, universal):
    """init.weights=UNIVERSAL init.optimizer=carry at TP = 2 ZeRO-3 from the CP = 2 ZeRO-2
    state: the engine holds exactly the converted tensors, and the run starts at step 0."""
    got = run_ranks(_loaded_moments_rank_fn, 2, [
        "run_dir=" + str(universal["cp2z2"].parent / "init_carry"), "parallel.tp=2",
        "zero.stage=3", f"init.weights={universal['cp2z2']}", "init.optimizer=carry",
        *trained["data"]])[0]
    assert got["step"] == 0
    want = {"fp32": read_universal_weights(universal["cp2z2"]),
            **{k: universal_state(universal["cp2z2"], k)
               for k in ("exp_avg", "exp_avg_sq")}}
    for key, tensors in want.items():
        assert got[key].keys() == tensors.keys()
        for name, t in tensors.items():
            assert torch.equal(got[key][name], t), (key, name)


@pytest.mark.slow
def test_bf16_moments_survive_conversion_and_a_new_layout(trained, tmp_path):
    """bf16 (DeepSpeed's bf16_* optimizer files): the moments and fp32 master weights the
    CP = 2 ZeRO-1 engine held at its last step are the converted ones, and a TP = 2
    ZeRO-2 engine loads exactly those."""
    bf16 = ["train.precision=bf16", *trained["data"]]
    src = tmp_path / "src"
    held = run_ranks(_loaded_moments_rank_fn, 2, [f"run_dir={src}", "parallel.cp=2",
                                                  "zero.stage=1", *STEPS, *bf16], True)[0]
    assert any(p.name.startswith("bf16_") for p in _tag(src).iterdir())
    uni = to_universal(src, tmp_path / "uni")
    got = run_ranks(_loaded_moments_rank_fn, 2, [
        f"run_dir={tmp_path / 'dst'}", "parallel.tp=2", "zero.stage=2",
        f"init.weights={uni}", *bf16])[0]
    files = {"fp32": read_universal_weights(uni),
             **{k: universal_state(uni, k) for k in ("exp_avg", "exp_avg_sq")}}
    for key, tensors in files.items():
        for name, t in tensors.items():
            assert torch.equal(held[key][name], t), (key, name)
            assert torch.equal(got[key][name], t), (key, name)


@pytest.mark.slow
def test_zero0_resumes_at_another_dp_cp_size(trained, tmp_path):
    """ZeRO 0 keeps the whole optimizer on every rank: resume=PATH works at CP = 2 from a
    single process, like the single process resumed."""
    data = trained["data"]
    src = tmp_path / "z0"
    run_ranks(train_rank_fn, 1, [f"run_dir={src}", "zero.stage=0", *STEPS, *data])
    _, native = _continue(tmp_path / "native", 1, f"resume={_tag(src)}", "zero.stage=0", *data)
    _, moved = _continue(tmp_path / "cp2", 2, f"resume={_tag(src)}", "parallel.cp=2",
                         "zero.stage=0", *data)
    assert _max_rel(moved, native) <= 1e-6, _max_rel(moved, native)
    with pytest.raises(ConversionError, match="ZeRO stage 0.*resume=PATH"):
        to_universal(src, tmp_path / "z0_uni")


def test_bad_inputs_fail_and_write_nothing(trained, universal, tmp_path):
    with pytest.raises(ConversionError, match="already exists"):
        to_universal(trained["tp2"], universal["tp2"])
    with pytest.raises(ConversionError, match="does not exist"):
        to_universal(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ConversionError, match="among a run's own checkpoints"):
        to_universal(trained["tp2"], trained["tp2"] / "checkpoints" / "step00000003")
    # a TP rank's optimizer shard missing: DeepSpeed's converter fails, nothing is left
    broken = tmp_path / "ckpts" / "step00000002"
    shutil.copytree(_tag(trained["tp2"]), broken)
    for f in broken.glob("*mp_rank_01_optim_states.pt"):
        f.unlink()
    with pytest.raises(Exception):  # noqa: B017 (DeepSpeed's own assertion)
        to_universal(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]
    # a checkpoint without the TP split info (not written by this trainer)
    for f in broken.glob("*model_states.pt"):
        state = torch.load(f, weights_only=False)
        state.pop("universal_checkpoint_info")
        torch.save(state, f)
    with pytest.raises(ConversionError, match="no universal_checkpoint_info"):
        to_universal(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]
    assert convert_main(["to-universal", str(broken), str(tmp_path / "out")]) == 2


def test_universal_into_zero0_or_another_model_is_refused(universal):
    from types import SimpleNamespace

    from mhla_dist.train.start import plan_start

    topo = SimpleNamespace(tp=1, dp_cp_size=2)
    cfg = load_config(None, TINY_RUN + ["zero.stage=0", f"init.weights={universal['tp2']}"])
    with pytest.raises(ConversionError, match="ZeRO stage 1, 2 or 3"):
        plan_start(cfg, None, topo)
    cfg = load_config(None, TINY_RUN + ["zero.stage=0", f"init.weights={universal['tp2']}",
                                        "init.optimizer=reset"])
    assert plan_start(cfg, None, topo).carry is False
    cfg = load_config(None, TINY_RUN + ["model.num_layers=3", f"resume={universal['tp2']}"])
    with pytest.raises(ConversionError, match="another model config: num_layers"):
        plan_start(cfg, universal["tp2"], topo)


def test_init_weights_takes_a_run_directory_and_checks_its_layout(trained):
    from types import SimpleNamespace

    from mhla_dist.train.start import plan_start

    cfg = load_config(None, TINY_RUN + [f"init.weights={trained['tp2']}"])
    plan = plan_start(cfg, None, SimpleNamespace(tp=2, dp_cp_size=1))
    assert (plan.source, plan.kind, plan.carry, plan.resume) == (
        _tag(trained["tp2"]), "checkpoint", True, False)
    with pytest.raises(ConversionError, match="saved at tp=2.*this run has tp=1.*to-universal"):
        plan_start(cfg, None, SimpleNamespace(tp=1, dp_cp_size=2))
    cfg = load_config(None, TINY_RUN + [f"init.weights={trained['tp2']}",
                                        "init.optimizer=reset"])
    assert plan_start(cfg, None, SimpleNamespace(tp=1, dp_cp_size=2)).carry is False
