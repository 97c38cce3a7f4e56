"""zero-to-safetensors: a ZeRO-3, TP = 2 checkpoint consolidates to the trainer's own
gathered weights exactly, and to what DeepSpeed's zero_to_fp32 gives for the same run on
one process (TP = 1) within fp32 tolerance; broken checkpoints fail before writing."""

from __future__ import annotations

import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.model_spec import ConversionError
from mhla_dist.convert.zero import consolidate_zero_checkpoint, zero_to_safetensors

# The TP = 2 and TP = 1 runs reduce in another order: after 2 Adam steps their weights
# agree to this relative error per tensor (||a - b|| / ||b||).
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_tp2_zero3_equals_single_process_zero_to_fp32(trained):
    state, cfg = consolidate_zero_checkpoint(trained["tp2"] / "checkpoints")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(trained["tp1"] / "checkpoints"))
    assert state.keys() == reference.keys()
    for name, ref in reference.items():
        assert state[name].shape == ref.shape, name
        assert rel(state[name], ref) <= RTOL, (name, rel(state[name], ref))
    assert cfg.num_heads == 2 and cfg.hidden_size == 32


def test_tp2_consolidation_is_the_trainers_gathered_weights(trained):
    state, _ = consolidate_zero_checkpoint(trained["tp2"])  # a run dir works too
    gathered = load_file(str(trained["tp2"] / "model.safetensors"))
    assert state.keys() == gathered.keys()
    for name, t in gathered.items():
        assert torch.equal(state[name], t), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_to_safetensors_writes_weights_and_config(trained, tmp_path, dtype):
    out = zero_to_safetensors(trained["tp2"] / "checkpoints" / "step00000002",
                              tmp_path / "model.safetensors", dtype=dtype)
    state, cfg = read_consolidated(out)
    assert (tmp_path / "model_config.json").is_file() and cfg.num_layers == 2
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert all(t.dtype == want for t in state.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors",
                                                         "model_config.json"]


def test_missing_tp_rank_fails_and_writes_nothing(trained, tmp_path):
    broken = tmp_path / "step00000002"
    shutil.copytree(trained["tp2"] / "checkpoints" / "step00000002", broken)
    for f in broken.glob("*mp_rank_01_*"):
        f.unlink()
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="TP|tp|mp_rank|match"):
        zero_to_safetensors(broken, tmp_path / "out" / "m.safetensors")
    assert not any((tmp_path / "out").iterdir())


def test_missing_folder_and_tag_are_clear(trained, tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        zero_to_safetensors(tmp_path / "nope", tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match="no tag folder 'step9'"):
        zero_to_safetensors(trained["tp2"], tmp_path / "m.safetensors", tag="step9")
    assert not (tmp_path / "m.safetensors").exists()
