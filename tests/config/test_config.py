"""Config loading: YAML with includes, dotlist overrides, and every validation error with
a message that names the key and the value."""

import pytest

from mhla_dist.config import ConfigError, LMConfig, config_to_yaml, load_config


def test_defaults_and_overrides_resolve_the_lm_sizes():
    cfg = load_config(None, ["model.hidden_size=96", "model.num_heads=3", "train.steps=7"])
    assert isinstance(cfg.model, LMConfig) and cfg.train.steps == 7
    assert (cfg.model.head_dim, cfg.model.block_size, cfg.model.num_blocks) == (32, 64, 4)
    assert cfg.model.ffn_hidden_size == 256  # 8/3 x 96 rounded up to a multiple of 64
    assert cfg.model.embed_init_std == cfg.model.init_std == 0.02
    assert load_config(None, ["model.embed_init_std=1.5"]).model.embed_init_std == 1.5


def test_yaml_defaults_include_other_files(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_size: 64\ntrain:\n  steps: 3\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "run.yaml", ["parallel.cp=2"])
    assert (cfg.model.hidden_size, cfg.train.steps, cfg.parallel.cp) == (64, 9, 2)


def test_preset_files_load():
    cfg = load_config("configs/lm/tiny.yaml", ["model.num_blocks=4", "model.block_size=null"])
    assert cfg.model.block_size == 64
    for name in ("single", "cp2", "tp2", "tp2cp2", "cp4"):
        load_config(f"configs/parallel/{name}.yaml")
    for stage in range(4):
        assert load_config(f"configs/zero/stage{stage}.yaml").zero.stage == stage


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("configs/lm/tiny.yaml", ["train.steps=5"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides,message", [
    (["model.hiden_size=3"], r"config key 'model.hiden_size': Key 'hiden_size' not in"),
    (["trian.steps=3"], r"config key 'trian': Key 'trian' not in"),
    (["model.hidden_size=abc"], r"'model.hidden_size': Value 'abc' of type 'str' could not"),
    (["model.kind=rnn"], r"model.kind='rnn' is not one of dit, lm"),
    (["steps"], r"override 'steps' is not of the form key=value"),
    (["model.max_seq_len=1000"], r"model.max_seq_len=1000 is not a multiple of "
                                 r"model.block_size=64"),
    (["model.num_blocks=3"], r"model.num_blocks=3 does not divide model.max_seq_len=256"),
    (["model.num_blocks=2", "model.block_size=64"], r"model.block_size=64 disagrees with "
                                                    r"model.max_seq_len=256 / model.num_blocks=2"),
    (["model.num_heads=3"], r"model.num_heads=3 does not divide model.hidden_size=128"),
    (["parallel.tp=3", "model.num_heads=4"], r"parallel.tp=3 does not divide model.num_heads=4"),
    (["parallel.cp=3"], r"parallel.cp=3 does not divide the 4 blocks"),
    (["data.seq_len=512"], r"data.seq_len=512 exceeds model.max_seq_len=256"),
    (["data.seq_len=96", "parallel.cp=2"], r"data.seq_len=96 is not a multiple of block size 64"
                                           r" x parallel.cp=2"),
    (["model.feature_map=softmax"], r"model.feature_map='softmax' is not one of relu, elu"),
    (["model.normalize=true", "model.rotary=true"], r"model.normalize=true needs non-negative"),
    (["model.softmax_layers=[5]"], r"model.softmax_layers=\[5\] has indices outside \[0, 2\)"),
    (["zero.stage=4"], r"zero.stage=4 is not one of 0, 1, 2, 3"),
    (["train.precision=fp16"], r"train.precision='fp16' is not one of fp32, bf16"),
    (["schedule.kind=linear"], r"schedule.kind='linear' is not one of cosine, wsd, constant"),
    (["logging.wandb.mode=cloud"], r"logging.wandb.mode='cloud' is not one of offline"),
    (["data.kind=audio"], r"data.kind='audio' is not one of text, video"),
    (["train.steps=0"], r"train.steps=0 must be >= 1"),
    (["checkpoint.keep_last=0"], r"checkpoint.keep_last=0 must be >= 1"),
    (["checkpoint.interval=-1"], r"checkpoint.interval=-1 must be >= 0"),
    (["optim.lr=0"], r"optim.lr=0.0 must be > 0"),
    (["model.embed_init_std=0"], r"model.embed_init_std=0.0 must be > 0"),
    (["model.init_std=-1"], r"model.init_std=-1.0 must be > 0"),
    (["optim.mixing_lr_scale=-1"], r"optim.mixing_lr_scale=-1.0 must be >= 0"),
    (["model.mixing_init=eye"], r"model.mixing_init='eye' is not one of average, identity, "),
    (["optim.betas=[0.9]"], r"optim.betas=\[0.9\] must be two numbers in \[0, 1\)"),
    (["schedule.decay_fraction=0"], r"schedule.decay_fraction=0.0 must be in \(0, 1\]"),
    (["resume=''"], r"resume='' must be 'auto', 'none' or a checkpoint path"),
    (["resume="], r"config key 'resume': Incompatible value 'None'"),
])
def test_config_errors_name_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zero.stage=9", "train.steps=0", "parallel.cp=3"])
    assert str(err.value).count("\n  - ") == 3


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "loop.yaml").write_text("defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match=r"config includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml")
