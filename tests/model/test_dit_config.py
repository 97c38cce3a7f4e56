"""DiTConfig: every validation error with its message, the presets' parameter counts, the
YAML preset files, and omegaconf structured-config use."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mhla_dist.config.dit import (
    DIT_PRESET_PARAMS,
    DIT_PRESETS,
    DiTConfig,
    dit_config,
)
from mhla_dist.model.dit_cost import dit_flops_per_sample, dit_num_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dit"

# (overrides of the tiny preset, a regex the message must match)
ERRORS = {
    "in_channels": (dict(in_channels=0), r"in_channels=0 must be a positive integer"),
    "frames": (dict(frames=-8), r"frames=-8 must be a positive integer"),
    "height-float": (dict(height=16.0), r"height=16.0 must be a positive integer"),
    "width": (dict(width=0), r"width=0 must be a positive integer"),
    "hidden_size": (dict(hidden_size=0), r"hidden_size=0 must be a positive integer"),
    "depth": (dict(depth=0), r"depth=0 must be a positive integer"),
    "num_heads": (dict(num_heads=True), r"num_heads=True must be a positive integer"),
    "patch-len": (dict(patch=[2, 2]), r"patch=\[2, 2\] must be 3 positive integers \(pt, ph"),
    "patch-zero": (dict(patch=[1, 0, 2]), r"patch=\[1, 0, 2\] must be 3 positive integers"),
    "block_grid-len": (dict(block_grid=[2, 2, 2, 2]),
                       r"block_grid=\[2, 2, 2, 2\] must be 3 positive integers \(fb, hb, wb\)"),
    "frames-patch": (dict(frames=9, patch=[2, 2, 2]),
                     r"frames=9 is not divisible by patch\[0\]=2; allowed patch\[0\]: a "
                     r"divisor of 9 \(1, 3, 9\)"),
    "height-patch": (dict(height=15),
                     r"height=15 is not divisible by patch\[1\]=2; allowed patch\[1\]: a "
                     r"divisor of 15 \(1, 3, 5, 15\)"),
    "width-patch": (dict(width=17, patch=[1, 2, 4]),
                    r"width=17 is not divisible by patch\[2\]=4"),
    "block-frames": (dict(block_grid=[3, 2, 2]),
                     r"block_grid\[0\]=3 does not divide the 8 patches along frames "
                     r"\(frames=8 / patch\[0\]=1\); allowed: a divisor of 8 \(1, 2, 4, 8\)"),
    "block-height": (dict(block_grid=[2, 3, 2]),
                     r"block_grid\[1\]=3 does not divide the 8 patches along height "
                     r"\(height=16 / patch\[1\]=2\)"),
    "block-width": (dict(width=24, block_grid=[2, 2, 8]),
                    r"block_grid\[2\]=8 does not divide the 12 patches along width"),
    "heads": (dict(num_heads=5),
              r"num_heads=5 does not divide hidden_size=64; allowed: a divisor of 64"),
    "mlp_ratio": (dict(mlp_ratio=0.0), r"mlp_ratio=0.0 must be > 0"),
    "num_classes": (dict(num_classes=-1), r"num_classes=-1 must be an integer >= 0"),
    "caption_dim": (dict(caption_dim=-4), r"caption_dim=-4 must be an integer >= 0"),
    "mixing_init": (dict(mixing_init="gauss"),
                    r"mixing_init='gauss' is not one of 'linear', 'cos', 'exp', 'local'"),
    "feature_map": (dict(feature_map="identity"),
                    r"feature_map='identity' is not one of 'relu', 'elu'"),
    "pos_embed": (dict(pos_embed="alibi"),
                  r"pos_embed='alibi' is not one of 'sincos', 'learned', 'rope'"),
    "rope-on-dit": (dict(pos_embed="rope"),
                    r"pos_embed='rope' with arch='dit': arch 'wan' uses pos_embed 'rope'"),
    "wan-sincos": (dict(arch="wan"), r"pos_embed='sincos' with arch='wan'"),
    "arch": (dict(arch="unet"), r"arch='unet' is not one of 'dit', 'wan'"),
    "wan-odd-head": (dict(arch="wan", pos_embed="rope", hidden_size=60, num_heads=4),
                     r"head_dim=15 \(hidden_size / num_heads\) must be even"),
    "text-and-caption": (dict(caption_dim=8, text_dim=8),
                         r"caption_dim=8 \(a pooled caption\) and text_dim=8 \(caption "
                         r"tokens\) both read emb.npy"),
    "text_len": (dict(text_dim=8, text_len=0), r"text_len=0 must be a positive integer"),
    "ffn_dim": (dict(ffn_dim=-1), r"ffn_dim=-1 must be an integer >= 0"),
    "norm_eps": (dict(norm_eps=0.0), r"norm_eps=0.0 must be > 0"),
    "softmax_layers-range": (dict(softmax_layers=[2]),
                             r"softmax_layers=\[2\] must be distinct block indices in "
                             r"\[0, depth=2\)"),
    "softmax_layers-dup": (dict(softmax_layers=[1, 1]), r"softmax_layers=\[1, 1\] must be"),
    "class_dropout": (dict(class_dropout=1.0), r"class_dropout=1.0 must be in \[0, 1\)"),
}


@pytest.mark.parametrize("overrides,message", ERRORS.values(), ids=ERRORS.keys())
def test_validate_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        dit_config("tiny", **overrides)


@pytest.mark.parametrize("tp,cp,message", [
    (3, 1, r"tp=3 does not divide num_heads=4"),
    (4, 1, None),
    (1, 3, r"cp=3 does not divide the 8 MHLA blocks \(block_grid=\[2, 2, 2\]\); .* "
           r"allowed cp: 1, 2, 4, 8"),
    (1, 8, None),
], ids=["tp3", "tp4-ok", "cp3", "cp8-ok"])
def test_check_parallel(tp, cp, message):
    cfg = dit_config("tiny")
    if message is None:
        cfg.check_parallel(tp, cp)
    else:
        with pytest.raises(ValueError, match=message):
            cfg.check_parallel(tp, cp)


def test_check_parallel_mlp():
    cfg = dit_config("tiny", mlp_ratio=4.015625)  # MLP hidden int(64 * 4.015625) = 257
    with pytest.raises(ValueError, match=r"tp=2 does not divide the MLP hidden size 257"):
        cfg.check_parallel(2, 1)


def test_dit_config_errors():
    with pytest.raises(ValueError, match=r"preset='dit-l2' is not one of 'tiny', 's2'"):
        dit_config("dit-l2")
    with pytest.raises(ValueError, match=r"unknown DiTConfig key\(s\) \['heads'\]"):
        dit_config("tiny", heads=4)


def test_derived_sizes():
    cfg = dit_config("wan1.3b")
    assert cfg.patch_grid == (21, 30, 52) and cfg.tile == (7, 6, 13)
    assert (cfg.num_tokens, cfg.num_blocks, cfg.block_size) == (32760, 60, 546)
    assert cfg.patch_dim == 64 and cfg.head_dim == 128 and cfg.mlp_hidden_size == 6144
    assert dit_config("tiny", patch=(2, 2, 2)).patch == [2, 2, 2]  # tuples accepted


@pytest.mark.parametrize("name", sorted(DIT_PRESET_PARAMS))
def test_preset_parameter_counts(name):
    """Within 5% of the name (the analytic count; test_dit checks it against a built model)."""
    count = dit_num_parameters(dit_config(name))
    target = DIT_PRESET_PARAMS[name]
    assert abs(count / target - 1) < 0.05, f"{name}: {count / 1e6:.1f}M vs {target / 1e6:.0f}M"


def test_flops_per_sample():
    cfg = dit_config("xl2")
    n, h, f = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden_size
    # Dense matmuls dominate an image DiT: a little over 6 x tokens x the per-token
    # weights (attention, MLP, patch in and out; adaLN acts once per clip).
    per_token = cfg.depth * (4 * h * h + 2 * h * f) + 2 * h * cfg.patch_dim
    ratio = dit_flops_per_sample(cfg) / (6 * n * per_token)
    assert 1.0 < ratio < 1.1, ratio
    # One softmax layer swaps the MHLA operator's terms for 12 N^2 h (fwd + bwd).
    d, m, heads = cfg.head_dim, cfg.num_blocks, cfg.num_heads
    mhla = 3 * heads * (4 * n * d * (d + 1) + 2 * m * m * d * (d + 1))
    hybrid = dit_config("xl2", softmax_layers=[0])
    assert dit_flops_per_sample(hybrid) - dit_flops_per_sample(cfg) == 12 * n * n * h - mhla


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_yaml_presets_match(name):
    """configs/dit/<name>.yaml: a `model:` section with kind: dit and DiTConfig's keys,
    equal to the preset; it loads through omegaconf's structured config."""
    raw = OmegaConf.load(CONFIGS / f"{name.replace('_', '.')}.yaml")
    assert set(raw) == {"model"} and raw.model.kind == "dit"
    section = OmegaConf.to_container(raw.model)
    section.pop("kind")
    merged = OmegaConf.merge(OmegaConf.structured(DiTConfig), section)
    cfg = OmegaConf.to_object(merged).validate()
    assert cfg == dit_config(name)
