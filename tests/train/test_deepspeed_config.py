"""The DeepSpeed config the trainer builds: the `zero.` options reach
`zero_optimization`, bf16 runs reduce gradients in `zero.reduce_dtype`, bad values are named."""

import pytest

from mhla_dist.config import ConfigError, load_config
from mhla_dist.train.trainer import deepspeed_config


def _ds(*overrides):
    return deepspeed_config(load_config(None, list(overrides)))


def test_zero_options_reach_deepspeed():
    z = _ds("zero.stage=2", "zero.overlap_comm=false", "zero.reduce_bucket_size=1000",
            "zero.allgather_bucket_size=2000")["zero_optimization"]
    assert z == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                 "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}
    assert "allgather_bucket_size" not in _ds("zero.stage=3")["zero_optimization"]
    assert _ds("zero.stage=0")["zero_optimization"] == {"stage": 0}


def test_bf16_reduces_in_fp32_by_default():
    ds = _ds("train.precision=bf16", "zero.stage=1")
    assert ds["bf16"] == {"enabled": True} and ds["communication_data_type"] == "fp32"
    assert _ds("train.precision=bf16", "zero.reduce_dtype=bf16")["communication_data_type"] \
        == "bf16"
    assert "communication_data_type" not in _ds("train.precision=fp32")


def test_bf16_accumulates_in_fp32_where_deepspeed_allows():
    for stage in (2, 3):
        assert _ds("train.precision=bf16", f"zero.stage={stage}")["data_types"] == \
            {"grad_accum_dtype": "fp32"}
    for stage in (0, 1):  # DeepSpeed refuses (0) or swaps in its BF16_Optimizer (1)
        assert "data_types" not in _ds("train.precision=bf16", f"zero.stage={stage}")


def test_bad_zero_values_are_named():
    with pytest.raises(ConfigError, match="zero.reduce_dtype='fp16'"):
        load_config(None, ["zero.reduce_dtype=fp16"])
    with pytest.raises(ConfigError, match="zero.reduce_bucket_size=0"):
        load_config(None, ["zero.reduce_bucket_size=0"])
