"""tools/model_summary.py: counts from the meta-device model, the memory model's ZeRO and
TP scaling, JSON output, and a clear error for a bad config."""

import json

import pytest

from mhla_dist.config import load_config
from mhla_dist.model.lm_flops import lm_num_parameters
from mhla_dist.model.summary import summarize
from mhla_dist.parallel import destroy_topology
from tools.model_summary import main


@pytest.fixture(autouse=True)
def _teardown():
    yield
    destroy_topology()


def test_json_output_has_parameters_and_flops(capsys):
    assert main(["--config", "configs/lm/tiny.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == lm_num_parameters(load_config("configs/lm/tiny.yaml").model)
    assert out["flops_per_token"] > 6 * out["parameters"] * 0.9
    assert out["flops_per_sample"] == pytest.approx(out["flops_per_token"] * 256)


def test_large_preset_is_counted_without_allocating():
    s = summarize(load_config("configs/lm/7b.yaml"))
    assert abs(s.parameters / 7e9 - 1) < 0.05


def test_memory_shrinks_with_zero_stage_and_tensor_parallelism():
    totals = [summarize(load_config("configs/lm/125m.yaml", [f"zero.stage={z}"]), 8)
              .memory_per_rank for z in range(4)]
    assert totals[1]["optimizer"] == totals[0]["optimizer"] // 8
    assert totals[2]["gradients"] == totals[0]["gradients"] // 8
    assert totals[3]["weights"] == totals[0]["weights"] // 8
    assert [t["total"] for t in totals] == sorted((t["total"] for t in totals), reverse=True)
    tp2 = summarize(load_config("configs/lm/125m.yaml", ["parallel.tp=2"]))
    tp1 = summarize(load_config("configs/lm/125m.yaml"))
    assert tp2.parameters == tp1.parameters and tp2.parameters_per_rank < tp1.parameters_per_rank


def test_sequence_parallelism_shards_all_activations_over_tp():
    """Korthikanti et al.: TP alone divides 24 of the 34 bytes per token and hidden unit,
    with SP all 34; the checkpointed layer inputs are sharded too."""
    for ckpt in ("false", "true"):
        base = ["parallel.tp=2", f"model.activation_checkpointing={ckpt}"]
        tp1 = summarize(load_config("configs/lm/125m.yaml", base[1:])).memory_per_rank
        tp2 = summarize(load_config("configs/lm/125m.yaml", base)).memory_per_rank
        sp = summarize(load_config("configs/lm/125m.yaml",
                                   [*base, "parallel.sequence_parallel=true"])).memory_per_rank
        assert abs(sp["activations"] / tp1["activations"] - 0.5) < 1e-6, ckpt
        assert sp["activations"] < tp2["activations"] < tp1["activations"]


def test_bad_config_is_an_error(capsys):
    assert main(["--config", "configs/lm/tiny.yaml", "parallel.cp=3"]) == 2
    assert "parallel.cp=3 does not divide" in capsys.readouterr().err
    assert main(["--config", "configs/lm/tiny.yaml", "--world-size", "3",
                 "parallel.cp=2"]) == 2


def test_dit_presets_are_summarized_per_sample(capsys):
    assert main(["--config", "configs/dit/xl2.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["parameters"] / 675e6 - 1) < 0.05
    assert out["flops_per_token"] is None and out["flops_per_sample"] > 0
    assert out["tokens_per_sample"] == 256
