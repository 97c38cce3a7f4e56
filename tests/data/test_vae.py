"""`load_vae` / `VideoVAE` against diffusers' own models: tiny random VAEs saved here."""

import json
import subprocess
import sys

import pytest
import torch

from mhla_dist.data import VideoVAE, load_vae

diffusers = pytest.importorskip("diffusers")

WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
KL_SHIFT, KL_SCALE = 0.1, 0.5


def tiny_wan(**overrides) -> "diffusers.AutoencoderKLWan":
    """A random Wan VAE: 4 latent channels, 2x down in time and space (`dim_mult=[1, 1]`)."""
    torch.manual_seed(0)
    cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
               latents_mean=WAN_MEAN, latents_std=WAN_STD, scale_factor_temporal=2,
               scale_factor_spatial=2)
    return diffusers.AutoencoderKLWan(**{**cfg, **overrides})


def tiny_kl(**overrides) -> "diffusers.AutoencoderKL":
    """A random image VAE: 4 latent channels, 2x down in space."""
    torch.manual_seed(0)
    cfg = dict(down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
               layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
               scaling_factor=KL_SCALE, shift_factor=KL_SHIFT)
    return diffusers.AutoencoderKL(**{**cfg, **overrides})


def save_tiny_vae(path, kind: str = "wan"):
    """Saves a tiny random VAE of `kind` ("wan" or "kl") to the folder `path`; returns it."""
    (tiny_wan() if kind == "wan" else tiny_kl()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {kind: save_tiny_vae(root / kind, kind) for kind in ("wan", "kl")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_encode(kind: str, model, x: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mean, normalised as its pipelines do; KL one frame at a time."""
    if kind == "wan":
        mu = model.encode(x).latent_dist.mean
        view = (1, -1, 1, 1, 1)
        return (mu - torch.tensor(WAN_MEAN).view(view)) / torch.tensor(WAN_STD).view(view)
    frames = [model.encode(x[:, :, f]).latent_dist.mean for f in range(x.shape[2])]
    return (torch.stack(frames, dim=2) - KL_SHIFT) * KL_SCALE


def reference_decode(kind: str, model, z: torch.Tensor) -> torch.Tensor:
    if kind == "wan":
        view = (1, -1, 1, 1, 1)
        return model.decode(z * torch.tensor(WAN_STD).view(view)
                            + torch.tensor(WAN_MEAN).view(view)).sample.clamp(-1, 1)
    frames = [model.decode(z[:, :, f] / KL_SCALE + KL_SHIFT).sample for f in range(z.shape[2])]
    return torch.stack(frames, dim=2).clamp(-1, 1)


@pytest.mark.parametrize("kind, latent", [("wan", (4, 3, 8, 6)), ("kl", (4, 5, 8, 6))],
                         ids=["wan", "kl"])
def test_load_vae_kind_and_latent_shape(vae_dirs, kind, latent):
    vae = load_vae(vae_dirs[kind])
    assert vae.kind == kind and vae.latent_channels == 4
    assert vae.latent_shape(5, 16, 12) == latent


@pytest.mark.parametrize("kind", ["wan", "kl"])
def test_encode_matches_diffusers(vae_dirs, kind):
    vae = load_vae(vae_dirs[kind])
    model = getattr(diffusers, "AutoencoderKLWan" if kind == "wan" else "AutoencoderKL") \
        .from_pretrained(vae_dirs[kind])
    x = torch.rand(2, 3, 5, 16, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(x)
    assert z.dtype == torch.float32 and tuple(z.shape) == (2, *vae.latent_shape(5, 16, 12))
    with torch.no_grad():
        ref = reference_encode(kind, model, x)
    assert rel_err(z, ref) < 1e-5, rel_err(z, ref)
    assert torch.equal(vae.encode(x), z)  # the posterior mean: deterministic


@pytest.mark.parametrize("kind", ["wan", "kl"])
def test_decode_matches_diffusers(vae_dirs, kind):
    vae = load_vae(vae_dirs[kind])
    model = getattr(diffusers, "AutoencoderKLWan" if kind == "wan" else "AutoencoderKL") \
        .from_pretrained(vae_dirs[kind])
    c, f, h, w = vae.latent_shape(5, 16, 12)
    z = torch.randn(2, c, f, h, w, generator=torch.Generator().manual_seed(2))
    out = vae.decode(z)
    assert out.dtype == torch.float32 and tuple(out.shape) == (2, 3, 5, 16, 12)
    assert float(out.abs().max()) <= 1.0
    with torch.no_grad():
        ref = reference_decode(kind, model, z)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)


def test_bf16_weights_give_float32_latents(vae_dirs):
    x = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    vae = load_vae(vae_dirs["kl"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    z = vae.encode(x)
    assert z.dtype == torch.float32 and vae.decode(z).dtype == torch.float32
    assert rel_err(z, load_vae(vae_dirs["kl"]).encode(x)) < 0.05


def test_load_vae_from_a_pipeline_folder(vae_dirs, tmp_path):
    tiny_kl().save_pretrained(tmp_path / "pipeline" / "vae")
    assert load_vae(tmp_path / "pipeline").kind == "kl"


def test_kl_without_shift_factor(tmp_path):
    tiny_kl(shift_factor=None).save_pretrained(tmp_path / "sd")
    vae = load_vae(tmp_path / "sd")
    x = torch.rand(1, 3, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ref = vae.model.encode(x[:, :, 0]).latent_dist.mean.unsqueeze(2) * KL_SCALE
    assert rel_err(vae.encode(x), ref) < 1e-5


@pytest.mark.parametrize("overrides, compression", [
    (dict(temperal_downsample=[False]), (1, 2)),
    (dict(dim_mult=[1, 1, 1], temperal_downsample=[False, True]), (2, 4)),
    (dict(dim_mult=[1, 1, 1], temperal_downsample=[True, True, False]), (4, 4)),  # Wan 2.1
    (dict(patch_size=2, in_channels=12, out_channels=12), (2, 4)),                # Wan 2.2
], ids=["t1-s2", "t2-s4", "t4-s4", "patch2"])
def test_wan_compression_read_from_the_architecture(overrides, compression):
    vae = VideoVAE(tiny_wan(**overrides), "wan")
    t, s = compression
    assert (vae.temporal_compression, vae.spatial_compression) == (t, s)
    assert vae.latent_shape(17, 32, 64) == (4, 16 // t + 1, 32 // s, 64 // s)


def test_wan_refuses_frame_counts_it_would_truncate(vae_dirs):
    vae = load_vae(vae_dirs["wan"])
    with pytest.raises(ValueError, match=r"frames=6: .*1 \+ 4k frames .*nearest 5 or 9"):
        vae.latent_shape(6, 16, 16)
    with pytest.raises(ValueError, match="frames=3"):
        vae.encode(torch.zeros(1, 3, 3, 16, 16))


def test_errors_name_the_bad_value(vae_dirs, tmp_path):
    vae = load_vae(vae_dirs["kl"])
    with pytest.raises(ValueError, match="height=16, width=15: .*spatial compression 2"):
        vae.latent_shape(1, 16, 15)
    with pytest.raises(ValueError, match=r"clips of shape \(1, 4, 1, 8, 8\)"):
        vae.encode(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"decode takes \[B, 4, F', H', W'\]"):
        vae.decode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="'UNet2DModel'.*AutoencoderKLWan, AutoencoderKL"):
        load_vae(tmp_path / "unet")
    with pytest.raises(ValueError, match="compresses time 8x"):
        VideoVAE(tiny_wan(dim_mult=[1, 1, 1, 1], temperal_downsample=[True] * 3), "wan")
    with pytest.raises(ValueError, match=r"latents_mean=\[0.0\] needs one value per latent"):
        VideoVAE(tiny_wan(latents_mean=[0.0]), "wan")


def test_without_diffusers(vae_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_vae(vae_dirs["wan"])
    # the package itself imports without diffusers
    code = "import sys; sys.modules['diffusers'] = None; import mhla_dist.data.vae"
    subprocess.run([sys.executable, "-c", code], check=True)
