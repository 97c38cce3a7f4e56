"""Initialisers of the mixing matrix (DESIGN §1 "Initialising Mc")."""

import math

import pytest
import torch

from mhla_kernels import block_grid_mixing, causal_mixing


def test_causal_mixing_is_lower_triangular_row_average():
    mc = causal_mixing(5, dtype=torch.float64)
    for i in range(5):
        for b in range(5):
            assert mc[i, b].item() == pytest.approx(1 / (i + 1) if b <= i else 0.0)


@pytest.mark.parametrize("transform", ["linear", "cos", "exp", "local"])
@pytest.mark.parametrize("grid", [(6,), (3, 4), (2, 3, 5)], ids=["1d", "2d", "3d"])
def test_block_grid_columns_sum_to_one(grid, transform):
    mc = block_grid_mixing(grid, transform, dtype=torch.float64)
    m = math.prod(grid)
    assert mc.shape == (m, m)
    assert torch.allclose(mc.sum(0), torch.ones(m, dtype=torch.float64))
    assert (mc >= 0).all()
    assert (mc.diagonal() == mc.max(0).values).all(), "a block weighs itself the most"


def test_block_grid_distances_follow_block_major_order():
    """Grid (fb, hb, wb) = (2, 2, 3): block index = (f * 2 + h) * 3 + w."""
    mc = block_grid_mixing((2, 2, 3), "exp", sigma=1.0, dtype=torch.float64)
    raw = mc / mc.diagonal()[None, :]
    index = {(f, h, w): (f * 2 + h) * 3 + w for f in range(2) for h in range(2) for w in range(3)}
    a, b = index[(0, 0, 0)], index[(1, 1, 2)]
    assert raw[a, b].item() == pytest.approx(math.exp(-math.sqrt(1 + 1 + 4)))
    a, b = index[(0, 1, 0)], index[(0, 1, 1)]
    assert raw[a, b].item() == pytest.approx(math.exp(-1))


def test_block_grid_transforms():
    lin = block_grid_mixing(3, "linear", dtype=torch.float64)  # distances 0, 1, 2
    assert torch.allclose(lin[:, 0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64) / 1.5)
    cos = block_grid_mixing(3, "cos", dtype=torch.float64)
    expect = torch.tensor([1.0, math.cos(math.pi / 4), 0.0], dtype=torch.float64)
    assert torch.allclose(cos[:, 0], expect / expect.sum())
    local = block_grid_mixing(4, "local", tau=0, dtype=torch.float64)
    assert torch.equal(local, torch.eye(4, dtype=torch.float64))
    assert block_grid_mixing(1).item() == 1.0


def test_block_grid_mixing_errors():
    with pytest.raises(ValueError, match=r"transform='gauss' is not one of linear, cos, exp"):
        block_grid_mixing(4, "gauss")
    with pytest.raises(ValueError, match=r"grid=\(2, 0\) must be 1 to 3 positive block counts"):
        block_grid_mixing((2, 0))
    with pytest.raises(ValueError, match=r"grid=\(1, 1, 1, 1\)"):
        block_grid_mixing((1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"sigma=0 must be > 0"):
        block_grid_mixing(4, "exp", sigma=0)
    with pytest.raises(ValueError, match=r"num_blocks=0 must be >= 1"):
        causal_mixing(0)


def test_feature_maps():
    from mhla_kernels import feature_map

    x = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(feature_map("relu", eps=0.5)(x), torch.tensor([0.5, 0.5, 3.5]))
    assert torch.allclose(feature_map("elu")(x), torch.nn.functional.elu(x) + 1)
    assert (feature_map("elu")(x) > 0).all()
    assert torch.equal(feature_map("identity", normalize=False)(x), x)
    with pytest.raises(ValueError, match=r"feature_map='identity' needs normalize=False"):
        feature_map("identity")
    with pytest.raises(ValueError, match=r"feature_map='softmax' is not one of relu, elu"):
        feature_map("softmax")
