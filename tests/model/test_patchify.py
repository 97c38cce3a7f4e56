"""patchify / unpatchify: exact round trip, block-major token order, the CP split into
whole tiles, and the shape errors."""

import pytest
import torch

from mhla_dist.model.patchify import patchify, token_positions, unpatchify

CASES = {
    "video": ((2, 3, 4, 6, 8), (2, 2, 2), (1, 3, 2)),
    "image": ((1, 4, 1, 32, 32), (1, 2, 2), (1, 4, 4)),
    "odd": ((1, 2, 6, 10, 15), (3, 5, 3), (2, 1, 5)),
    "one-block": ((2, 1, 3, 4, 4), (1, 1, 1), (1, 1, 1)),
    "token-blocks": ((1, 3, 2, 4, 6), (1, 2, 2), (2, 2, 3)),
}


@pytest.mark.parametrize("shape,patch,block_grid", CASES.values(), ids=CASES.keys())
def test_round_trip_is_exact(shape, patch, block_grid):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tokens = patchify(x, patch, block_grid)
    n = (shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2])
    assert tokens.shape == (shape[0], n, shape[1] * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, shape[1:], patch, block_grid), x)
    # patchify is a permutation: every value appears once.
    assert torch.equal(tokens.flatten().sort().values, x.flatten().sort().values)


def test_token_position_explicit():
    """Clip [1, 2, 4, 6, 8], patch (2, 2, 2) -> patch grid (2, 3, 4); block grid (1, 3, 2)
    -> tiles of (2, 1, 2) patches. Token 5 is tile 1 (hb=0, wb=1), its 2nd patch in
    row-major (tf, th, tw) order: (tf, th, tw) = (0, 0, 1) -> patch (f, h, w) = (0, 0, 3)."""
    shape, patch, grid = (1, 2, 4, 6, 8), (2, 2, 2), (1, 3, 2)
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    tokens = patchify(x, patch, grid)
    f, h, w = 0, 0, 3
    expect = x[0, :, 2 * f:2 * f + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2].reshape(-1)
    assert torch.equal(tokens[0, 5], expect)  # flattened as (C, pt, ph, pw)
    assert token_positions((2, 3, 4), grid)[5].tolist() == [f, h, w]
    # The last token: last tile (hb=2, wb=1), its last patch.
    assert token_positions((2, 3, 4), grid)[-1].tolist() == [1, 2, 3]


def test_conv_layout():
    """A token's vector is its patch flattened as a Conv3d weight (C, pt, ph, pw)."""
    x = torch.randn(2, 3, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    conv = torch.nn.Conv3d(3, 5, (2, 2, 2), stride=(2, 2, 2), bias=False)
    ref = conv(x)  # [B, 5, 2, 3, 4]
    tokens = patchify(x, (2, 2, 2), (1, 1, 1)) @ conv.weight.reshape(5, -1).T
    assert torch.allclose(tokens, ref.flatten(2).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("cp", [2, 3, 6])
def test_contiguous_split_gives_whole_tiles(cp):
    """Splitting block-major tokens contiguously over `cp` ranks gives each rank whole
    tiles, outermost (temporal) axis first."""
    patch_grid, block_grid = (6, 4, 4), (3, 2, 2)  # 12 tiles of (2, 2, 2)
    pos = token_positions(patch_grid, block_grid)
    tiles = pos // torch.tensor([2, 2, 2])  # the tile of each token
    per_rank = pos.shape[0] // cp
    for r in range(cp):
        mine = tiles[r * per_rank:(r + 1) * per_rank]
        ids, counts = (mine[:, 0] * 4 + mine[:, 1] * 2 + mine[:, 2]).unique(
            return_counts=True)
        assert ids.tolist() == list(range(r * 12 // cp, (r + 1) * 12 // cp))
        assert (counts == 8).all()  # every tile complete
    # Rank 0 of cp=3 holds exactly the first temporal slab of tiles.
    assert (tiles[: pos.shape[0] // 3, 0] == 0).all()


ERRORS = {
    "not-5d": (lambda: patchify(torch.zeros(1, 4, 4, 4), (1, 1, 1), (1, 1, 1)),
               r"patchify expects a clip \[B, C, F, H, W\]; got shape \(1, 4, 4, 4\)"),
    "patch-frames": (lambda: patchify(torch.zeros(1, 1, 3, 4, 4), (2, 2, 2), (1, 1, 1)),
                     r"frames=3 is not divisible by the patch size 2"),
    "patch-width": (lambda: patchify(torch.zeros(1, 1, 2, 4, 5), (1, 2, 2), (1, 1, 1)),
                    r"width=5 is not divisible by the patch size 2"),
    "blocks": (lambda: patchify(torch.zeros(1, 1, 2, 6, 4), (1, 2, 2), (1, 2, 1)),
               r"the 3 patches along height \(6 / 2\) are not divisible by the 2 blocks"),
    "grid-len": (lambda: patchify(torch.zeros(1, 1, 2, 4, 4), (2, 2), (1, 1, 1)),
                 r"patch=\(2, 2\) and block_grid=\(1, 1, 1\) must each have 3 entries"),
    "tokens": (lambda: unpatchify(torch.zeros(1, 7, 8), (1, 2, 4, 4), (1, 2, 2), (1, 1, 1)),
               r"tokens of shape \(1, 7, 8\) do not fit a clip \(1, 2, 4, 4\) with "
               r"patch=\(1, 2, 2\): expected \[B, 8, 4\]"),
}


@pytest.mark.parametrize("call,message", ERRORS.values(), ids=ERRORS.keys())
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
