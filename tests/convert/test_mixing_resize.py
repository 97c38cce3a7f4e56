"""resize-mixing: bilinear (aligned corners) along each block axis; same size is the
identity; causal results are lower-triangular with the source's row sums; a resized
checkpoint loads into the model of the new config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.mixing_resize import (
    resize_causal,
    resize_checkpoint_mixing,
    resize_grid,
)
from mhla_dist.convert.model_spec import ConversionError, build_model, single_rank_groups
from mhla_kernels import block_grid_mixing, causal_mixing


def test_one_axis_is_bilinear_with_aligned_corners():
    mc = torch.randn(3, 5, 5, dtype=torch.float64)
    want = F.interpolate(mc[:, None], size=(9, 9), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(resize_grid(mc, [5], [9]), want)
    assert torch.equal(resize_grid(mc, [5], [5]), mc)


def test_grid_resize_is_identity_at_the_same_grid_and_keeps_constants():
    mc = block_grid_mixing((2, 3, 4))
    torch.testing.assert_close(resize_grid(mc, (2, 3, 4), (2, 3, 4)), mc)
    out = resize_grid(torch.full((24, 24), 0.5), (2, 3, 4), (3, 3, 2))
    assert out.shape == (18, 18) and torch.allclose(out, torch.full_like(out, 0.5))


@pytest.mark.parametrize("new", [2, 7, 16], ids=lambda n: f"M{n}")
def test_causal_resize_masks_and_keeps_row_sums(new):
    out = resize_causal(causal_mixing(8), new)
    assert out.shape == (new, new)
    assert out.triu(1).abs().max() == 0
    torch.testing.assert_close(out.sum(-1), torch.ones(new))


def test_checkpoint_resize_loads_into_the_new_model(trained, tmp_path):
    from mhla_dist.convert.zero import zero_to_safetensors

    src = zero_to_safetensors(trained["tp2"], tmp_path / "a.safetensors")
    (tmp_path / "b").mkdir()
    rep = resize_checkpoint_mixing(src, tmp_path / "b" / "b.safetensors", {"max_seq_len": 128})
    state, cfg = read_consolidated(tmp_path / "b" / "b.safetensors")
    assert cfg.max_seq_len == 128 and cfg.num_blocks == 8 and len(rep.mapped) == 2
    assert state["layers.0.attn.mixing"].shape == (8, 8)
    old, _ = read_consolidated(src)
    assert torch.equal(state["layers.0.attn.q_proj.weight"], old["layers.0.attn.q_proj.weight"])
    with single_rank_groups() as g:
        model = build_model(cfg, tp_group=g, cp_group=g)
        model.load_state_dict(state)
        assert torch.isfinite(model(torch.randint(0, 257, (1, 128)))).all()
    with pytest.raises(ConversionError, match="cannot change"):
        resize_checkpoint_mixing(src, tmp_path / "c.safetensors", {"hidden_size": 64})
    assert not (tmp_path / "c.safetensors").exists()
