"""inspect: the tree, shapes, counts, config and Mc statistics of a file or a folder."""

from __future__ import annotations

import pytest

from mhla_dist.convert.inspection import describe, mixing_stats
from mhla_dist.convert.model_spec import ConversionError
from mhla_kernels import causal_mixing


def test_describes_a_deepspeed_folder_and_a_safetensors_file(trained):
    for path in (trained["tp2"] / "checkpoints", trained["tp2"] / "model.safetensors"):
        text = describe(path)
        assert '"hidden_size": 32' in text
        assert "q_proj" in text and "32x32" in text and "float32" in text
        assert "layers.0.attn.mixing 4x4" in text
        assert "total" in text and "43,264" in text
    assert "TP = 2" in describe(trained["tp2"] / "checkpoints")


def test_mixing_stats_of_the_causal_init():
    s = mixing_stats(causal_mixing(4))
    assert s["upper_abs_max"] == 0 and abs(s["row_sum_min"] - 1) < 1e-6
    assert s["diag_mean"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        describe(tmp_path / "nope.safetensors")
