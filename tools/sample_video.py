"""Sample clips from a trained MHLA DiT's consolidated weights (rectified-flow Euler steps).

    python tools/sample_video.py runs/shapes --labels 0 1 2 3 --cfg-scale 4.0 --steps 25
    python tools/sample_video.py runs/captions --caption caption.npy --num 2

Loads RUN_DIR/model.safetensors and RUN_DIR/config.yaml, builds the DiT in this one process
(any training layout: the weights are consolidated), draws noise `[num, C, F, H, W]` from
`--seed` and integrates it to clips. Writes to `--out` (default RUN_DIR/samples), and
prints the paths of:

- `samples.npy`: float32 `[num, C, F, H, W]`, the model's value range ([-1, 1] for pixels);
- `samples.png`: one row per sample, one column per frame, one pixel per pixel;
- `samples_labelled.png`: the same grid for people: each frame `--zoom` times larger
  (nearest neighbour), a gap between frames, the frame numbers above and each row's
  class (its `--class-names` name, `null` for the null class) or sample number beside;
- `samples.gif`: every sample side by side (in row order, named above), zoomed alike,
  one GIF frame per clip frame at `--fps`, looping.

Values are mapped from [-1, 1] to 0..255 and clipped; RGB when the model has 3 channels,
otherwise the first channel in grey (e.g. for latents).

Class labels: a model with `num_classes > 0` gets `--labels` (default `0, 1, ...` modulo
num_classes; `num_classes` itself is the null class). A caption model (`caption_dim > 0`)
gets `--caption FILE.npy`, `[D]` for every sample or `[num, D]`; a caption-token model
(`text_dim > 0`, e.g. Wan) `[L, D]` or `[num, L, D]` text-encoder tokens; without one the
captions are zeros (the unconditional caption). `--cfg-scale` > 1 is classifier-free
guidance against the zero caption. `--vae DIR` (a local diffusers VAE folder) decodes
latent samples for the pictures; `samples.npy` keeps the latents.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mhla_dist.config import DiTConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.video_pictures import (  # noqa: E402  (the repo root first, as a script)
    AUTO_ZOOM_PX,
    GAP,
    LABEL_H,
    auto_zoom,
    check_class_names,
    clip_frames_to_grid,
    clip_pixels,
    gif_frames,
    labelled_grid,
    row_names,
    write_samples,
)

__all__ = ["AUTO_ZOOM_PX", "GAP", "LABEL_H", "auto_zoom", "check_class_names",
           "clip_frames_to_grid", "clip_pixels", "gif_frames", "labelled_grid", "row_names",
           "sample_video", "write_samples"]
log = logging.getLogger("sample_video")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_labels(num_classes: int, num: int | None, labels: list[int] | None
                   ) -> tuple[int | None, torch.Tensor | None]:
    """`(num, labels [num] or None)` from `--num` and `--labels` for a model with
    `num_classes` classes (`--labels` sets num; without them the caller cycles through
    the classes once num is known)."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"--labels {' '.join(map(str, labels))} given, but the model has "
                             f"num_classes=0 (no class conditioning): drop --labels")
        return num, None
    if labels is None:  # the default labels wait for num (a [num, D] caption may set it)
        return num, None
    bad = [v for v in labels if not 0 <= v <= num_classes]
    if bad:
        raise ValueError(f"--labels {bad} out of range: labels must be in [0, {num_classes}] "
                         f"(num_classes={num_classes}; {num_classes} is the null class)")
    if num is not None and num != len(labels):
        raise ValueError(f"--num {num} but {len(labels)} --labels given; give one label per "
                         f"sample (or drop --num: --labels sets it)")
    return len(labels), torch.tensor(labels, dtype=torch.long)


def load_caption(path: Path, m: DiTConfig) -> torch.Tensor:
    """The caption file as float32: a pooled caption `[D]` or `[rows, D]` (D = the model's
    `caption_dim`), or caption tokens `[L, D]` or `[rows, L, D]` (D = `text_dim`,
    `L <= text_len`)."""
    tokens = m.text_dim > 0
    dim = m.text_dim if tokens else m.caption_dim
    if dim == 0:
        raise ValueError(f"--caption {path} given, but the model has caption_dim=0 and "
                         f"text_dim=0 (no caption conditioning): drop --caption")
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"caption {path} must be one .npy array, not an archive of several")
    ndims, what = ((2, 3), f"[L, text_dim] or [num, L, text_dim] with text_dim={dim}") \
        if tokens else ((1, 2), f"[caption_dim] or [num, caption_dim] with caption_dim={dim}")
    if arr.ndim not in ndims or arr.shape[-1] != dim:
        raise ValueError(f"caption {path} has shape {list(arr.shape)}; the model takes {what}")
    if tokens and not 1 <= arr.shape[-2] <= m.text_len:
        raise ValueError(f"caption {path} has {arr.shape[-2]} tokens; the model takes 1 to "
                         f"text_len={m.text_len}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"caption {path} has dtype {arr.dtype}; it must hold numbers")
    if not np.isfinite(arr).all():
        raise ValueError(f"caption {path} holds non-finite values (NaN or inf)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def captions_for(caption: torch.Tensor, num: int, path: Path, tokens: bool = False
                 ) -> torch.Tensor:
    """`[num, ...]`: one caption (`[D]`, or `[L, D]` tokens) repeated, or as given."""
    if caption.dim() == 1 + tokens:
        return caption.expand(num, *caption.shape).clone()
    if caption.shape[0] != num:
        raise ValueError(f"caption {path} has {caption.shape[0]} rows for {num} samples; give "
                         f"one {list(caption.shape[1:])} caption for all or one row per sample")
    return caption


def conditioning(m: DiTConfig, num: int | None, labels: list[int] | None, caption_path: Path | None,
                 cfg_scale: float):
    """`(num, labels [num] or None, caption [num, D] or None, text [num, L, D] or None)` for
    the DiT config `m` from the command line (caption tokens go to `text`, padded with
    zeros to `text_len` for a `text_mask: false` model such as Wan); every mismatch with
    the model is a `ValueError` naming both sides."""
    num, label_t = resolve_labels(m.num_classes, num, labels)
    tokens = m.text_dim > 0
    caption = None
    if caption_path is not None:
        caption = load_caption(caption_path, m)
        if num is None and caption.dim() == 2 + tokens:
            num = caption.shape[0]
    elif m.caption_dim or m.text_dim:
        log.warning("the model takes captions (caption_dim=%d, text_dim=%d) and no --caption "
                    "was given: sampling with zero captions (the unconditional caption)",
                    m.caption_dim, m.text_dim)
    num = 4 if num is None else num
    if caption is not None:
        caption = captions_for(caption, num, caption_path, tokens)
    if m.num_classes and label_t is None:
        label_t = torch.arange(num, dtype=torch.long) % m.num_classes
    if cfg_scale != 1.0 and label_t is None and caption is None:
        raise ValueError(f"--cfg-scale {cfg_scale} needs labels or a caption to guide with: "
                         f"the model has num_classes=0 and caption_dim={m.caption_dim}, and no "
                         f"--caption was given (use --cfg-scale 1)")
    text = None
    if tokens and caption is not None:
        text, caption = caption, None
        if not m.text_mask:  # Wan: zeros up to text_len, all attended
            text = torch.nn.functional.pad(text, (0, 0, 0, m.text_len - text.shape[1]))
    return num, label_t, caption, text


def dit_config(run_dir: Path) -> DiTConfig:
    """RUN_DIR's DiT config, at the one-process layout the sampler runs at."""
    from mhla_dist.config import DiTConfig, load_config

    cfg = load_config(run_dir / "config.yaml",
                      ["parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false"])
    if not isinstance(cfg.model, DiTConfig):
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} model, not a DiT (kind 'dit')")
    return cfg.model


def sample_video(run_dir: Path, *, num: int | None, labels: list[int] | None,
                 caption_path: Path | None, cfg_scale: float, steps: int, shift: float,
                 seed: int, dtype: str) -> np.ndarray:
    """Float32 clips `[num, C, F, H, W]` sampled from RUN_DIR's DiT."""
    from safetensors.torch import load_file

    from mhla_dist.model.rectified_flow import euler_sample, sampling_times
    from mhla_dist.model.video import build_dit
    from mhla_dist.parallel import build_topology, destroy_topology

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
    if num is not None and num < 1:
        raise ValueError(f"--num {num} must be >= 1")
    m = dit_config(run_dir)
    sampling_times(steps, shift=shift)  # bad steps / shift fail before the model is built
    num, label_t, caption, text = conditioning(m, num, labels, caption_path, cfg_scale)
    noise = torch.randn(num, m.in_channels, m.frames, m.height, m.width,
                        generator=torch.Generator().manual_seed(seed))
    build_topology()
    try:
        model = build_dit(m)
        weights = run_dir / "model.safetensors"
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            raise ValueError(f"{weights} does not fit the DiT of {run_dir / 'config.yaml'}: "
                             f"{exc}") from None
        model.to(DTYPES[dtype]).eval()
        out = euler_sample(model, noise, label_t, steps, cfg_scale=cfg_scale, caption=caption,
                           shift=shift, text=text)
        return out.float().numpy()
    finally:
        destroy_topology()


def decode(vae_dir: Path, samples: np.ndarray) -> np.ndarray:
    """Latent samples `[num, C, F', H', W']` decoded by the VAE in `vae_dir` to frames
    `[num, 3, F, H, W]` in [-1, 1] (`mhla_dist.data.vae`)."""
    from mhla_dist.data import load_vae

    vae = load_vae(vae_dir)
    if samples.shape[1] != vae.latent_channels:
        raise ValueError(f"--vae {vae_dir} decodes {vae.latent_channels}-channel latents; the "
                         f"model samples {samples.shape[1]} channels")
    with torch.no_grad():
        return vae.decode(torch.from_numpy(samples)).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--num", type=int, default=None,
                   help="samples (default 4, or as many as --labels / caption rows)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="one class per sample")
    p.add_argument("--caption", type=Path, default=None,
                   help=".npy caption embedding [D] (all samples) or [num, D]")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1: none)")
    p.add_argument("--steps", type=int, default=25, help="Euler steps")
    p.add_argument("--shift", type=float, default=1.0, help="time shift (> 1: more steps "
                   "near noise)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", type=Path, default=None, help="output folder (RUN_DIR/samples)")
    p.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                   help="one name per class, in label order, for the pictures")
    p.add_argument("--zoom", type=int, default=0, help="pixels per clip pixel in the "
                   f"labelled grid and the GIF (0: enough for {AUTO_ZOOM_PX}-pixel clips)")
    p.add_argument("--fps", type=float, default=4.0, help="GIF frames per second")
    p.add_argument("--vae", type=Path, default=None, metavar="DIR",
                   help="a local diffusers VAE folder: the samples are its latents; the "
                        "pictures show them decoded (samples.npy keeps the latents)")
    args = p.parse_args(argv)
    if args.zoom < 0 or args.fps <= 0:
        p.error(f"--zoom {args.zoom} must be >= 0 and --fps {args.fps} > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        num_classes = dit_config(args.run_dir).num_classes
        check_class_names(num_classes, args.class_names)
        samples = sample_video(args.run_dir, num=args.num, labels=args.labels,
                               caption_path=args.caption, cfg_scale=args.cfg_scale,
                               steps=args.steps, shift=args.shift, seed=args.seed,
                               dtype=args.dtype)
        names = row_names(len(samples), num_classes, args.labels, args.class_names)
        frames = decode(args.vae, samples) if args.vae else None
        paths = write_samples(samples, args.out or args.run_dir / "samples", names,
                              args.zoom, args.fps, frames)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
