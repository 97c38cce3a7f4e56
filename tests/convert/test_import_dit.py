"""import-dit: a random facebookresearch-layout DiT (learn_sigma, 10 classes) imports with
every tensor equal to its source after the documented reorders; the patch embedding and the
final layer compute what DiT's Conv2d and unpatchify compute; bad sources write nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.import_dit import import_dit
from mhla_dist.convert.model_spec import ConversionError, build_model, single_rank_groups
from mhla_dist.model.patchify import token_positions

H, DEPTH, P, SIDE, C, CLASSES = 64, 2, 2, 8, 4, 10
GRID = SIDE // P
OPTS = dict(num_heads=4, block_grid=[1, 2, 2])


def fake_dit(depth: int = DEPTH, h: int = H, seed: int = 0) -> dict[str, torch.Tensor]:
    """A facebookresearch/DiT `models.py` state dict with random tensors (learn_sigma)."""
    H = h  # noqa: N806 (the module constant's name, for readable shapes)
    g = torch.Generator().manual_seed(seed)
    s = {"pos_embed": (1, GRID * GRID, H), "x_embedder.proj.weight": (H, C, P, P),
         "x_embedder.proj.bias": (H,), "t_embedder.mlp.0.weight": (H, 256),
         "t_embedder.mlp.0.bias": (H,), "t_embedder.mlp.2.weight": (H, H),
         "t_embedder.mlp.2.bias": (H,), "y_embedder.embedding_table.weight": (CLASSES + 1, H),
         "final_layer.linear.weight": (P * P * 2 * C, H),
         "final_layer.linear.bias": (P * P * 2 * C,),
         "final_layer.adaLN_modulation.1.weight": (2 * H, H),
         "final_layer.adaLN_modulation.1.bias": (2 * H,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s |= {b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
              b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
              b + "mlp.fc1.weight": (4 * H, H), b + "mlp.fc1.bias": (4 * H,),
              b + "mlp.fc2.weight": (H, 4 * H), b + "mlp.fc2.bias": (H,),
              b + "adaLN_modulation.1.weight": (6 * H, H),
              b + "adaLN_modulation.1.bias": (6 * H,)}
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in s.items()}


def dit_unpatchify(x: torch.Tensor, c: int) -> torch.Tensor:
    """facebookresearch/DiT `unpatchify`: `[N, T, p*p*c]` -> `[N, c, H, W]`."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, P, P, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * P, w * P)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dit")
    src = fake_dit()
    torch.save({"ema": src, "model": {}, "args": None}, tmp / "dit.pt")
    rep = import_dit(tmp / "dit.pt", tmp / "mhla.safetensors", **OPTS)
    state, cfg = read_consolidated(tmp / "mhla.safetensors")
    return src, state, cfg, rep, tmp


def test_config_inferred_and_tensors_equal_the_source(imported):
    src, state, cfg, rep, tmp = imported
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.in_channels) == (H, DEPTH, 4, C)
    assert (cfg.height, cfg.width, cfg.frames, cfg.patch) == (SIDE, SIDE, 1, [1, P, P])
    assert cfg.num_classes == CLASSES and cfg.mlp_ratio == 4.0
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = src[b + f"attn.qkv.{part}"].chunk(3)
            assert torch.equal(state[b + f"attn.q_proj.{part}"], q)
            assert torch.equal(state[b + f"attn.k_proj.{part}"], k)
            assert torch.equal(state[b + f"attn.v_proj.{part}"], v)
            assert torch.equal(state[b + f"attn.o_proj.{part}"], src[b + f"attn.proj.{part}"])
            for name in ("mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                assert torch.equal(state[b + f"{name}.{part}"], src[b + f"{name}.{part}"])
        assert state[b + "attn.mixing"].shape == (4, 4)
    for name in ("t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                 "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        assert torch.equal(state[name], src[name])
    assert torch.equal(state["y_embedder.table.weight"], src["y_embedder.embedding_table.weight"])
    assert torch.equal(state["x_embedder.weight"], src["x_embedder.proj.weight"].reshape(H, -1))
    dropped = {d["source"] for d in rep.dropped}
    assert dropped == {"pos_embed", "final_layer.linear.weight[variance rows]",
                       "final_layer.linear.bias[variance rows]"}
    assert {c["target"] for c in rep.created} == {f"blocks.{i}.attn.mixing" for i in range(2)}
    assert json.loads((tmp / "mhla.report.json").read_text())["mapped"]


def test_patch_embedding_and_final_layer_match_dit(imported):
    src, state, cfg, _, _ = imported
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, C, SIDE, SIDE, generator=g)
    # DiT row-major token index of each of our block-major tokens
    pos = token_positions(cfg.patch_grid, cfg.block_grid)
    order = pos[:, 1] * GRID + pos[:, 2]
    with single_rank_groups() as grp:
        model = build_model(cfg, tp_group=grp, cp_group=grp)
        model.load_state_dict(state)
        with torch.no_grad():
            ours = model.x_embedder(model.patchify(img[:, :, None]))
            conv = F.conv2d(img, src["x_embedder.proj.weight"], src["x_embedder.proj.bias"],
                            stride=P).flatten(2).transpose(1, 2)  # [B, T, hidden], row-major
            torch.testing.assert_close(ours, conv[:, order])

            x = torch.randn(2, GRID * GRID, H, generator=g)  # hidden states, DiT's order
            c = torch.randn(2, H, generator=g)
            shift, scale = F.linear(F.silu(c), src["final_layer.adaLN_modulation.1.weight"],
                                    src["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
            xn = F.layer_norm(x, (H,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
            dit_out = F.linear(xn, src["final_layer.linear.weight"],
                               src["final_layer.linear.bias"])
            expect = dit_unpatchify(dit_out, 2 * C)[:, :C]
            got = model.unpatchify(model.final_layer(x[:, order], c))[:, :, 0]
            torch.testing.assert_close(got, expect)

            out = model(torch.randn(2, C, 1, SIDE, SIDE, generator=g), torch.rand(2),
                        torch.tensor([3, CLASSES]))
    assert out.shape == (2, GRID * GRID, C * P * P) and torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_preset_safetensors_learned_pos_embed_and_no_null_row(tmp_path):
    h = 96  # s2 has 6 heads
    src = fake_dit(depth=12, h=h)
    src = {k: v for k, v in src.items() if not k.startswith("final_layer.linear")} | {
        "final_layer.linear.weight": torch.randn(P * P * C, h),
        "final_layer.linear.bias": torch.randn(P * P * C)}
    src["y_embedder.embedding_table.weight"] = torch.randn(CLASSES, h)  # no class dropout
    save_file(src, str(tmp_path / "dit.safetensors"))
    rep = import_dit(tmp_path / "dit.safetensors", tmp_path / "m.safetensors", preset="s2",
                     hidden_size=h, height=SIDE, width=SIDE, num_classes=CLASSES,
                     block_grid=[1, 2, 2], pos_embed="learned", per_head_mixing=True)
    state, cfg = read_consolidated(tmp_path / "m.safetensors")
    assert cfg.num_heads == 6 and cfg.depth == 12 and not rep.dropped
    table = state["y_embedder.table.weight"]
    assert torch.equal(table[:CLASSES], src["y_embedder.embedding_table.weight"])
    assert not table[CLASSES].any()
    pos = token_positions(cfg.patch_grid, cfg.block_grid)
    assert torch.equal(state["pos_embed"], src["pos_embed"][0, pos[:, 1] * GRID + pos[:, 2]])
    assert state["blocks.3.attn.mixing"].shape == (6, 4, 4)
    w = src["final_layer.linear.weight"].view(P, P, C, h)  # DiT rows (ph, pw, C)
    assert torch.equal(state["final_layer.linear.weight"].view(C, P, P, h)[2, 1, 0], w[1, 0, 2])


def test_wrong_shape_and_unknown_key_fail_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    src = fake_dit()
    src["blocks.1.mlp.fc2.weight"] = torch.zeros(H, 3 * H)
    torch.save(src, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc2\.weight: \(64, 192\), "
                                              r"expected \(64, 256\)"):
        import_dit(tmp_path / "bad.pt", out / "m.safetensors", **OPTS)
    src = fake_dit() | {"blocks.0.attn.q_norm.weight": torch.ones(16)}
    torch.save(src, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"no place.*blocks\.0\.attn\.q_norm\.weight \(16,\)"):
        import_dit(tmp_path / "extra.pt", out / "m.safetensors", **OPTS)
    with pytest.raises(ConversionError, match="give num_heads"):
        import_dit(tmp_path / "extra.pt", out / "m.safetensors", block_grid=[1, 2, 2])
    with pytest.raises(ConversionError, match=r"pos_embed has shape \(1, 16, 64\)"):
        import_dit(tmp_path / "bad.pt", out / "m.safetensors", preset="xl2", hidden_size=H,
                   depth=DEPTH, num_classes=CLASSES)
    assert not any(out.iterdir())
