"""import-wan: a tiny random `WanTransformer3DModel` built and saved by diffusers itself.
Imported with every self-attention softmax it computes diffusers' forward (same latents,
timestep, text tokens); the report accounts for every tensor; imported as MHLA it runs,
the same at CP = 2 as in one process, and fine-tunes on synthetic clips with caption
tokens; unsupported sources are refused with what was found, writing nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mhla_dist.convert.files import read_consolidated
from mhla_dist.convert.import_wan import import_wan, wan_import_config
from mhla_dist.convert.model_spec import ConversionError, build_model, single_rank_groups
from tests.numerics import rel_err
from tests.parallel.harness import run_ranks
from tests.train.launching import ROOT, launch_env

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
            num_layers=2, rope_max_seq_len=32)
# The latents (4 frames of 8x8: a 4x4x4 patch grid) and 2x2x2 MHLA blocks of 8 tokens.
CLIP = dict(frames=4, height=8, width=8, block_grid=[2, 2, 2])
CLIP_ARGS = [f"{k}={v}".replace(" ", "") for k, v in CLIP.items()]


def diffusers_wan(folder, seed: int = 0, **sizes):
    """A random `WanTransformer3DModel` (`TINY` + `sizes`) saved to `folder`. Every weight
    is nudged off its init: unit norm weights and zero biases would hide swapped tensors."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY, **sizes}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    return diffusers_wan(folder), folder


@pytest.fixture(scope="module")
def mhla(wan, tmp_path_factory):
    """The tiny Wan imported with MHLA self-attention (one Mc per head)."""
    out = tmp_path_factory.mktemp("mhla") / "wan.safetensors"
    rep = import_wan(wan[1], out, per_head_mixing=True, **CLIP)
    return out, rep


def _inputs(cfg, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.frames, cfg.height, cfg.width, generator=g)
    text = torch.randn(batch, 7, cfg.text_dim, generator=g)
    return x, torch.tensor([0.3, 0.8])[:batch], text


def _velocity(path, x, t, text):
    state, cfg = read_consolidated(path)
    with single_rank_groups() as group:
        model = build_model(cfg, tp_group=group, cp_group=group).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            return model.velocity(x, t, None, None, text)


def test_softmax_import_through_the_cli_equals_diffusers(wan, tmp_path, capsys, monkeypatch):
    import diffusers.models.embeddings as embeddings

    from mhla_dist.model.dit_layers import sinusoidal_embedding
    from tools import convert_checkpoint

    ref, folder = wan
    out = tmp_path / "wan.safetensors"
    assert convert_checkpoint.main(["import-wan", str(folder), str(out), *CLIP_ARGS,
                                    "softmax_layers=[0,1]"]) == 0
    text_out = capsys.readouterr().out
    assert "2 of 2 self-attention layers kept softmax (Wan itself)" in text_out
    assert "created" not in text_out.split("\n", 1)[1]  # softmax layers need no Mc
    _, cfg = read_consolidated(out)
    assert (cfg.arch, cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.ffn_dim) == \
        ("wan", 24, 2, 2, 32)
    assert (cfg.text_dim, cfg.text_len, cfg.text_mask, cfg.patch_grid) == \
        (16, 512, False, (4, 4, 4))
    x, t, text = _inputs(cfg)
    ours = _velocity(out, x, t, text)
    with torch.no_grad():
        want = ref(x, t * 1000, text).sample
    assert (ours - want).abs().max().item() <= 1e-5
    # What is left is diffusers' fp32 sin/cos of 1000 t (Wan's own code and ours use
    # fp64): with fp64 frequencies given to diffusers, only fp32 rounding remains.
    monkeypatch.setattr(embeddings, "get_timestep_embedding",
                        lambda ts, dim, *args, **kwargs: sinusoidal_embedding(ts, dim).float())
    with torch.no_grad():
        want = ref(x, t * 1000, text).sample
    assert (ours - want).abs().max().item() <= 2e-6


def test_cli_help(capsys):
    from tools import convert_checkpoint

    with pytest.raises(SystemExit) as exc:
        convert_checkpoint.main(["import-wan", "--help"])
    assert exc.value.code == 0 and "config.json + safetensors" in capsys.readouterr().out


def test_report_lists_every_source_tensor_and_the_created_mixing(wan, mhla):
    from safetensors.torch import load_file

    _, folder = wan
    out, rep = mhla
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    mapped = {m["source"]: m for m in rep.mapped}
    assert set(mapped) == set(source) and not rep.dropped
    assert len(rep.mapped) == len(source)
    assert "reshaped" in mapped["patch_embedding.weight"]["how"]
    assert "permuted" in mapped["proj_out.weight"]["how"]
    assert mapped["blocks.1.attn2.to_out.0.weight"]["target"] == "blocks.1.cross_attn.o_proj.weight"
    assert {c["target"]: c["shape"] for c in rep.created} == {
        "blocks.0.attn.mixing": [2, 8, 8], "blocks.1.attn.mixing": [2, 8, 8]}
    assert json.loads(out.with_suffix(".report.json").read_text())["mapped"] == rep.mapped
    state, cfg = read_consolidated(out)
    w = source["proj_out.weight"].view(1, 2, 2, 4, 24)  # Wan's rows (pt, ph, pw, C)
    assert torch.equal(state["head.linear.weight"].view(4, 1, 2, 2, 24)[3, 0, 1, 0], w[0, 1, 0, 3])
    assert torch.equal(state["x_embedder.weight"], source["patch_embedding.weight"].view(24, -1))
    assert cfg.softmax_layers == [] and cfg.per_head_mixing


def test_sharded_source_imports_the_same(wan, mhla, tmp_path):
    ref, _ = wan
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    import_wan(tmp_path / "sharded", tmp_path / "m.safetensors", per_head_mixing=True, **CLIP)
    got, want = read_consolidated(tmp_path / "m.safetensors")[0], read_consolidated(mhla[0])[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def cp_rank_fn(rank, world, path):
    """The imported MHLA model's velocity at CP = `world` and in one process (each rank)."""
    import torch.distributed as dist

    from mhla_dist.parallel.topology import init_distributed

    init_distributed("gloo")
    solos = [dist.new_group([r]) for r in range(world)]
    state, cfg = read_consolidated(path)
    x, t, text = _inputs(cfg)
    out = {}
    for name, cp_group in (("cp", dist.group.WORLD), ("single", solos[rank])):
        model = build_model(cfg, tp_group=solos[rank], cp_group=cp_group).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            out[name] = model.velocity(x, t, None, None, text)
    return out


def test_mhla_import_runs_and_cp2_equals_single_process(mhla):
    out, _ = mhla
    ranks = run_ranks(cp_rank_fn, 2, str(out))
    single = ranks[0]["single"]
    assert single.shape == (2, 4, 4, 8, 8) and torch.isfinite(single).all()
    assert single.abs().sum() > 0
    for rank, got in enumerate(ranks):
        err = rel_err(got["cp"], single)
        assert err < 1e-6, f"rank {rank}: CP = 2 vs one process, rel err {err:.2e}"


def _edited_source(wan, tmp_path, **config):
    """A copy of the tiny source with config.json keys replaced."""
    _, folder = wan
    target = tmp_path / "edited"
    target.mkdir()
    (target / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    hf = json.loads((folder / "config.json").read_text()) | config
    (target / "config.json").write_text(json.dumps(hf))
    return target


@pytest.mark.parametrize("config, match", [
    (dict(image_dim=1280), r"image_dim=1280 \(image conditioning, I2V"),
    (dict(added_kv_proj_dim=24), r"added_kv_proj_dim=24"),
    (dict(qk_norm="rms_norm"), r"qk_norm='rms_norm'"),
    (dict(cross_attn_norm=False), r"cross_attn_norm=False"),
    (dict(out_channels=8), r"out_channels=8 != in_channels=4"),
    (dict(_class_name="WanVACETransformer3DModel"), r"is a 'WanVACETransformer3DModel'"),
    (dict(vace_layers=[0]), r"config keys this importer does not know: \['vace_layers'\]"),
], ids=["i2v", "added-kv", "qk-norm", "no-cross-norm", "out-channels", "class", "unknown-key"])
def test_unsupported_configs_are_refused(wan, tmp_path, config, match):
    source = _edited_source(wan, tmp_path, **config)
    with pytest.raises(ConversionError, match=match):
        import_wan(source, tmp_path / "m.safetensors", **CLIP)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_sources_and_configs_fail_and_write_nothing(wan, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = wan
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"config .*empty/config\.json does not exist"):
        import_wan(tmp_path / "empty", out / "m.safetensors", **CLIP)
    # the sizes the source fixes, against a preset made for Wan2.1-1.3B
    with pytest.raises(ConversionError, match=r"differ from the config \(preset 'wan2.1-1.3b'"
                                              r"\): in_channels: source 4, config 16; "
                                              r"hidden_size: source 24, config 1536"):
        import_wan(folder, out / "m.safetensors", preset="wan2.1-1.3b")
    with pytest.raises(ConversionError, match="does not fix the clip: give height, block_grid"):
        import_wan(folder, out / "m.safetensors", frames=4, width=8)
    with pytest.raises(ConversionError, match=r"patch grid \[4, 40, 4\] .* rope_max_seq_len=32"):
        import_wan(folder, out / "m.safetensors", **{**CLIP, "height": 80})
    extra = _edited_source(wan, tmp_path)
    state = load_file(str(extra / "diffusion_pytorch_model.safetensors"))
    state["blocks.0.attn1.norm_added_k.weight"] = torch.ones(24)
    save_file(state, str(extra / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"no place.*norm_added_k\.weight \(24,\)"):
        import_wan(extra, out / "m.safetensors", **CLIP)
    assert not any(out.iterdir())


def test_config_from_a_preset_and_all_softmax_layers(wan):
    hf = json.loads((wan[1] / "config.json").read_text())
    sizes = dict(in_channels=4, hidden_size=24, num_heads=2, depth=2, ffn_dim=32, text_dim=16)
    cfg = wan_import_config(hf, "wan2.1-1.3b", **sizes, **CLIP, softmax_layers="all")
    assert cfg.softmax_layers == [0, 1] and cfg.text_len == 512 and not cfg.text_mask


def test_imported_mhla_fine_tunes_on_synthetic_clips(tmp_path):
    """Pixels (in_channels 3) of 4 frames of 8x8 with caption tokens, 30 steps from the
    imported weights: the loss falls."""
    import yaml

    from mhla_dist.data import write_synthetic_video

    diffusers_wan(tmp_path / "transformer", in_channels=3, out_channels=3)
    weights = tmp_path / "wan.safetensors"
    import_wan(tmp_path / "transformer", weights, **CLIP, text_len=8, caption_dropout=0.0)
    write_synthetic_video(tmp_path / "clips", num_clips=16, frames=4, size=8,
                          clips_per_shard=8, caption_dim=16, text_tokens=8)
    _, cfg = read_consolidated(weights)
    run = tmp_path / "run"
    config = tmp_path / "finetune.yaml"
    model = json.loads((tmp_path / "model_config.json").read_text())
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "model": model,
        "data": {"kind": "video", "train": str(tmp_path / "clips"), "micro_batch_size": 8,
                 "shuffle_buffer": 8},
        "optim": {"lr": 3e-3, "weight_decay": 0.0}, "schedule": {"kind": "constant"},
        "train": {"steps": 30}, "logging": {"interval": 1, "wandb": {"mode": "disabled"}},
        "checkpoint": {"interval": 0}}))
    proc = subprocess.run([sys.executable, "-m", "mhla_dist.train", "--config", str(config),
                           f"init.weights={weights}"], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"weights from {weights} (file" in proc.stderr
    assert cfg.text_dim == 16 and cfg.in_channels == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss {first:.4f} (first 5 steps) -> {last:.4f} (last 5)"
