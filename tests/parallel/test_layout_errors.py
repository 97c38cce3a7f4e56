"""Every divisibility error of the parallel layout names its numbers."""

import pytest

from mhla_dist.parallel import LayoutError, check_cp_shard, check_layout


def test_valid_layout_returns_data_parallel_degree():
    assert check_layout(8, tp=2, cp=2, num_heads=8, seq_len=4096, block_size=256) == 2


def test_degrees_must_divide_world():
    with pytest.raises(LayoutError, match=r"tp=3 x cp=2 = 6 does not divide the world size 8"):
        check_layout(8, tp=3, cp=2)


def test_tp_must_divide_heads():
    with pytest.raises(LayoutError, match=r"tp=4 does not divide the 6 attention heads"):
        check_layout(8, tp=4, num_heads=6)


def test_cp_must_divide_tokens():
    with pytest.raises(LayoutError, match=r"cp=4 does not divide the sequence length 1002"):
        check_layout(4, cp=4, seq_len=1002)


def test_block_size_must_divide_local_tokens():
    with pytest.raises(LayoutError, match=r"block_size=256 does not divide the 384 tokens each "
                                          r"of the 2 context-parallel ranks holds"):
        check_layout(2, cp=2, seq_len=768, block_size=256)


def test_all_problems_in_one_error():
    with pytest.raises(LayoutError) as err:
        check_layout(6, tp=4, cp=1, num_heads=6)
    assert "does not divide the world size 6" in str(err.value)
    assert "does not divide the 6 attention heads" in str(err.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_degrees_must_be_positive_integers(bad):
    with pytest.raises(LayoutError, match=rf"cp={bad!r} must be a positive integer"):
        check_layout(4, cp=bad)


def test_cp_shard_checks():
    assert check_cp_shard(512, 4, 128, 16) == 4
    with pytest.raises(ValueError, match=r"block_size=100 does not divide the 512 tokens each of "
                                         r"the 4 context-parallel ranks holds \(sequence length "
                                         r"2048\)"):
        check_cp_shard(512, 4, 100, 32)
    with pytest.raises(ValueError, match=r"mixing is 8x8 but the 2048-token sequence has 16 "
                                         r"blocks of 128"):
        check_cp_shard(512, 4, 128, 8)
