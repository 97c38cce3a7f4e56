"""Video VAEs from a local diffusers folder: pixel clips <-> normalised latents.

```python
vae = load_vae("checkpoints/wan-vae", device="cuda", dtype=torch.bfloat16)
vae.latent_shape(17, 256, 256)   # (16, 5, 32, 32) for Wan 2.1: (C, F', H', W')
z = vae.encode(clips)            # [B, 3, F, H, W] in [-1, 1] -> [B, C, F', H', W'] float32
x = vae.decode(z)                # -> [B, 3, F, H, W] float32 in [-1, 1]
```
The folder is what `save_pretrained` writes (`config.json` and the weights), or a
diffusers pipeline folder holding one in `vae/`; nothing is downloaded. Two kinds:
- `"wan"`, `AutoencoderKLWan`: a causal 3-D VAE, `F' = (F - 1) // t + 1` for `F = 1 + 4k`
  frames (diffusers encodes the frames after the first in chunks of 4);
- `"kl"`, `AutoencoderKL`: an image VAE applied to each frame, `F' = F`.
The compressions (`t`, and the spatial `s`: `H' = H / s`) are read off the architecture in
the config, not assumed. Latents are the posterior mean (deterministic), normalised as
diffusers' pipelines do: Wan `(mu - latents_mean) / latents_std` per channel, KL
`(mu - shift_factor) * scaling_factor`; `decode` undoes that.

diffusers is a dev extra: it is imported by `load_vae`, not by this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

KINDS = {"AutoencoderKLWan": "wan", "AutoencoderKL": "kl"}
WAN_CHUNK = 4  # frames per encoder call after the first, fixed in diffusers' AutoencoderKLWan


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("a VAE folder needs diffusers (pip install diffusers, or the dev "
                          "extra: pip install -e '.[dev]')") from exc
    return diffusers


def _config_path(path: Path) -> Path:
    for candidate in (path / "config.json", path / "vae" / "config.json"):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"VAE folder {path} does not exist (nothing is downloaded: "
                                "pass a local diffusers folder, e.g. one save_pretrained wrote)")
    raise FileNotFoundError(f"VAE folder {path} has no config.json (nor vae/config.json): "
                            f"expected a diffusers {' or '.join(KINDS)} folder")


def load_vae(path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> VideoVAE:
    """The `AutoencoderKLWan` / `AutoencoderKL` in a local diffusers folder, in eval mode."""
    config_path = _config_path(Path(path))
    try:
        cls = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{config_path} is not a diffusers config ({exc})") from exc
    if cls not in KINDS:
        raise ValueError(f"{config_path}: _class_name={cls!r}; a VAE folder must hold one of "
                         f"{', '.join(KINDS)}")
    model = getattr(_diffusers(), cls).from_pretrained(config_path.parent, torch_dtype=dtype,
                                                       local_files_only=True)
    model = model.to(device).eval().requires_grad_(False)
    vae = VideoVAE(model, KINDS[cls])
    log.info("VAE %s (%s): %d latent channels, compression %d x %d x %d (frames x height x "
             "width)", config_path.parent, cls, vae.latent_channels, vae.temporal_compression,
             vae.spatial_compression, vae.spatial_compression)
    return vae


class VideoVAE:
    """A diffusers VAE behind one interface for both kinds (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, kind: str):
        if kind not in KINDS.values():
            raise ValueError(f"kind={kind!r}; expected one of {sorted(KINDS.values())}")
        self.model, self.kind = model, kind
        c = model.config
        if kind == "wan":
            downs = len(c.dim_mult) - 1
            self.temporal_compression = 2 ** sum(bool(d) for d in c.temperal_downsample[:downs])
            self.spatial_compression = 2 ** downs * (c.get("patch_size") or 1)
            self.latent_channels = int(c.z_dim)
            if WAN_CHUNK % self.temporal_compression:
                raise ValueError(f"temperal_downsample={list(c.temperal_downsample)} compresses "
                                 f"time {self.temporal_compression}x; diffusers encodes chunks "
                                 f"of {WAN_CHUNK} frames, so 1, 2 or 4x work")
            stats = {name: c.get(name) for name in ("latents_mean", "latents_std")}
            for name, values in stats.items():
                if values is None or len(values) != self.latent_channels:
                    raise ValueError(f"the Wan VAE config's {name}={values} needs one value per "
                                     f"latent channel (z_dim={self.latent_channels})")
            self._shift = torch.tensor(stats["latents_mean"], dtype=torch.float32)
            self._scale = 1.0 / torch.tensor(stats["latents_std"], dtype=torch.float32)
            for name, ours in (("scale_factor_temporal", self.temporal_compression),
                               ("scale_factor_spatial", self.spatial_compression)):
                if c.get(name) not in (None, ours):
                    log.warning("the Wan VAE config says %s=%s; its architecture compresses "
                                "%dx (used here)", name, c.get(name), ours)
        else:
            self.temporal_compression = 1
            self.spatial_compression = 2 ** (len(c.block_out_channels) - 1)
            self.latent_channels = int(c.latent_channels)
            self._shift = torch.full((self.latent_channels,), float(c.shift_factor or 0.0))
            self._scale = torch.full((self.latent_channels,), float(c.scaling_factor))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, F', H', W')` of a clip of `frames` frames of `height x width`; `ValueError`
        for sizes this VAE cannot encode and decode back to the same size."""
        if min(frames, height, width) < 1:
            raise ValueError(f"frames={frames}, height={height}, width={width} must be >= 1")
        if self.kind == "wan" and (frames - 1) % WAN_CHUNK:
            k = (frames - 1) // WAN_CHUNK
            valid = sorted({1 + WAN_CHUNK * k, 1 + WAN_CHUNK * (k + 1)})
            raise ValueError(f"frames={frames}: the Wan VAE encodes 1 + {WAN_CHUNK}k frames "
                             f"(1, 5, 9, 13, 17, ...; nearest {' or '.join(map(str, valid))})")
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"height={height}, width={width}: both must be multiples of the "
                             f"VAE's spatial compression {s}")
        return (self.latent_channels, (frames - 1) // self.temporal_compression + 1,
                height // s, width // s)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, self.latent_channels, 1, 1, 1)
        return self._shift.to(like.device).view(view), self._scale.to(like.device).view(view)

    @torch.no_grad()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """`clips: [B, 3, F, H, W]` floats in [-1, 1] -> normalised latents
        `[B, C, F', H', W']` float32, on the device `clips` came from."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips of shape {tuple(clips.shape)}; encode takes [B, 3, F, H, W]")
        self.latent_shape(*clips.shape[2:])
        x = clips.to(self.device, self.dtype)
        if self.kind == "wan":
            mu = self.model.encode(x).latent_dist.mean
        else:  # each frame is an image: [B, 3, F, H, W] -> [B * F, 3, H, W] and back
            b, c, f, h, w = x.shape
            mu = self.model.encode(x.transpose(1, 2).reshape(b * f, c, h, w)).latent_dist.mean
            mu = mu.reshape(b, f, *mu.shape[1:]).transpose(1, 2)
        mu = mu.float()
        shift, scale = self._stats(mu)
        return ((mu - shift) * scale).contiguous().to(clips.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised `latents: [B, C, F', H', W']` -> clips `[B, 3, F, H, W]` float32 in
        [-1, 1] (clamped), on the device `latents` came from."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)}; decode takes "
                             f"[B, {self.latent_channels}, F', H', W']")
        z = latents.to(self.device, torch.float32)
        shift, scale = self._stats(z)
        z = (z / scale + shift).to(self.dtype)
        if self.kind == "wan":
            out = self.model.decode(z).sample
        else:
            b, c, f, h, w = z.shape
            out = self.model.decode(z.transpose(1, 2).reshape(b * f, c, h, w)).sample
            out = out.reshape(b, f, *out.shape[1:]).transpose(1, 2)
        return out.float().clamp(-1.0, 1.0).contiguous().to(latents.device)
