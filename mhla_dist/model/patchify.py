"""3-D patchify of clips into block-major tokens, and its exact inverse.

A clip `[B, C, F, H, W]` with patch `(pt, ph, pw)` has a patch grid
`(T, Hp, Wp) = (F/pt, H/ph, W/pw)`. The grid is tiled by `block_grid = (fb, hb, wb)`
into tiles of `(tf, th, tw) = (T/fb, Hp/hb, Wp/wb)` patches. Token order is block-major:
tiles in row-major `(fb, hb, wb)` order, each tile's patches contiguous and row-major
`(tf, th, tw)` inside it. Each MHLA block of `tf*th*tw` tokens is then one spatio-temporal
tile, and a contiguous split of the tokens over context-parallel ranks hands every rank
whole tiles, temporal axis first (DESIGN §2). A token's vector is its patch flattened as
`(C, pt, ph, pw)`: the layout of a `Conv3d(C, hidden, patch, stride=patch)` weight, so a
conv patch embedding converts to the linear one by a reshape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# [B, C, fb, tf, pt, hb, th, ph, wb, tw, pw] -> [B, fb, hb, wb, tf, th, tw, C, pt, ph, pw]
_TO_TOKENS = (0, 2, 5, 8, 3, 6, 9, 1, 4, 7, 10)
_FROM_TOKENS = tuple(sorted(range(11), key=_TO_TOKENS.__getitem__))


def _grids(shape: Sequence[int], patch: Sequence[int], block_grid: Sequence[int]):
    """`(patch grid, tile)` for clip dims `(F, H, W)`; raises naming the sizes that fail."""
    patch, block_grid = tuple(patch), tuple(block_grid)
    if len(patch) != 3 or len(block_grid) != 3:
        raise ValueError(f"patch={patch} and block_grid={block_grid} must each have 3 entries "
                         "(frames, height, width)")
    names = ("frames", "height", "width")
    grid = []
    for name, size, p, b in zip(names, shape, patch, block_grid, strict=True):
        if size % p:
            raise ValueError(f"{name}={size} is not divisible by the patch size {p} "
                             f"(patch={patch})")
        if (size // p) % b:
            raise ValueError(f"the {size // p} patches along {name} ({size} / {p}) are not "
                             f"divisible by the {b} blocks (block_grid={block_grid})")
        grid.append(size // p)
    return tuple(grid), tuple(g // b for g, b in zip(grid, block_grid, strict=True))


def patchify(x: torch.Tensor, patch: Sequence[int], block_grid: Sequence[int]) -> torch.Tensor:
    """`[B, C, F, H, W]` -> block-major tokens `[B, N, C*pt*ph*pw]`, `N = F*H*W/(pt*ph*pw)`."""
    if x.dim() != 5:
        raise ValueError(f"patchify expects a clip [B, C, F, H, W]; got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    (_, _, _), (tf, th, tw) = _grids(x.shape[2:], patch, block_grid)
    pt, ph, pw = patch
    fb, hb, wb = block_grid
    x = x.reshape(b, c, fb, tf, pt, hb, th, ph, wb, tw, pw).permute(_TO_TOKENS)
    return x.reshape(b, fb * hb * wb * tf * th * tw, c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, shape: Sequence[int], patch: Sequence[int],
               block_grid: Sequence[int]) -> torch.Tensor:
    """The exact inverse of `patchify`: tokens `[B, N, C*pt*ph*pw]` -> `[B, C, F, H, W]`.

    `shape`: the clip's `(C, F, H, W)`.
    """
    c, f, h, w = shape
    (t_, hp, wp), (tf, th, tw) = _grids((f, h, w), patch, block_grid)
    pt, ph, pw = patch
    fb, hb, wb = block_grid
    expect = (t_ * hp * wp, c * pt * ph * pw)
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expect:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit a clip {tuple(shape)} "
                         f"with patch={tuple(patch)}: expected [B, {expect[0]}, {expect[1]}]")
    x = tokens.reshape(tokens.shape[0], fb, hb, wb, tf, th, tw, c, pt, ph, pw)
    return x.permute(_FROM_TOKENS).reshape(tokens.shape[0], c, f, h, w)


def token_positions(patch_grid: Sequence[int], block_grid: Sequence[int]) -> torch.Tensor:
    """`[N, 3]` long: the `(f, h, w)` patch-grid coordinates of each block-major token."""
    axes = [torch.arange(n) for n in patch_grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [3, T, Hp, Wp]
    return patchify(coords[None], (1, 1, 1), block_grid)[0]
