"""Sample clips from a trained MHLA DiT's consolidated weights (rectified-flow Euler steps).

    python tools/sample_video.py runs/shapes --labels 0 1 2 3 --cfg-scale 4.0 --steps 25
    python tools/sample_video.py runs/captions --caption caption.npy --num 2

Loads RUN_DIR/model.safetensors and RUN_DIR/config.yaml, builds the DiT in this one process
(any training layout: the weights are consolidated), draws noise `[num, C, F, H, W]` from
`--seed` and integrates it to clips. Writes `samples.npy` (float32 `[num, C, F, H, W]`, the
model's value range, [-1, 1] for pixels) and `samples.png` (one row per sample, one column
per frame; values mapped from [-1, 1] to 0..255 and clipped; RGB when the model has 3
channels, otherwise the first channel in grey, e.g. for latents) to `--out`, default
RUN_DIR/samples, and prints the two paths.

Class labels: a model with `num_classes > 0` gets `--labels` (default `0, 1, ...` modulo
num_classes; `num_classes` itself is the null class). A caption model (`caption_dim > 0`)
gets `--caption FILE.npy`, `[D]` for every sample or `[num, D]`; without one the captions
are zeros (the unconditional caption). `--cfg-scale` > 1 is classifier-free guidance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mhla_dist.config import DiTConfig

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


def load_caption(path: Path, caption_dim: int) -> torch.Tensor:
    """The caption file as float32 `[D]` or `[rows, D]`; D must be the model's
    `caption_dim`."""
    if caption_dim == 0:
        raise ValueError(f"--caption {path} given, but the model has caption_dim=0 (no caption "
                         f"conditioning): drop --caption")
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"caption {path} must be one .npy array, not an archive of several")
    if arr.ndim not in (1, 2) or arr.shape[-1] != caption_dim:
        raise ValueError(f"caption {path} has shape {list(arr.shape)}; the model takes "
                         f"[caption_dim] or [num, caption_dim] with caption_dim={caption_dim}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"caption {path} has dtype {arr.dtype}; it must hold numbers")
    if not np.isfinite(arr).all():
        raise ValueError(f"caption {path} holds non-finite values (NaN or inf)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def captions_for(caption: torch.Tensor, num: int, path: Path) -> torch.Tensor:
    """`[num, D]`: one `[D]` caption repeated, or `[num, D]` as given."""
    if caption.dim() == 1:
        return caption.expand(num, -1).clone()
    if caption.shape[0] != num:
        raise ValueError(f"caption {path} has {caption.shape[0]} rows for {num} samples; give "
                         f"one [{caption.shape[1]}] caption for all or one row per sample")
    return caption


def clip_frames_to_grid(samples: np.ndarray) -> np.ndarray:
    """`[num, C, F, H, W]` in [-1, 1] -> uint8 `[num*H, F*W, 3]` (C == 3) or `[num*H, F*W]`
    (the first channel): row n is sample n, column f its frame f."""
    n, c, f, h, w = samples.shape
    x = samples if c == 3 else samples[:, :1]
    pixels = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)
    grid = pixels.transpose(0, 3, 2, 4, 1).reshape(n * h, f * w, x.shape[1])  # [n,H,F,W,C]
    return grid if c == 3 else grid[..., 0]


def _replace_into(path: Path, write) -> None:
    """Write through a temporary name and rename, so a reader never sees a half file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(samples: np.ndarray, out: Path) -> tuple[Path, Path]:
    """`out/samples.npy` and `out/samples.png` (see the module docstring)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    npy, png = out / "samples.npy", out / "samples.png"
    _replace_into(npy, lambda fh: np.save(fh, samples.astype(np.float32)))
    image = Image.fromarray(clip_frames_to_grid(samples))
    _replace_into(png, lambda fh: image.save(fh, format="PNG"))
    return npy, png


def conditioning(m: DiTConfig, num: int | None, labels: list[int] | None, caption_path: Path | None,
                 cfg_scale: float) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """`(num, labels [num] or None, caption [num, D] or None)` for the DiT config `m` from
    the command line; every mismatch with the model is a `ValueError` naming both sides."""
    num, label_t = resolve_labels(m.num_classes, num, labels)
    caption = None
    if caption_path is not None:
        caption = load_caption(caption_path, m.caption_dim)
        if num is None and caption.dim() == 2:
            num = caption.shape[0]
    elif m.caption_dim:
        log.warning("the model takes captions (caption_dim=%d) and no --caption was given: "
                    "sampling with zero captions (the unconditional caption)", m.caption_dim)
    num = 4 if num is None else num
    if caption is not None:
        caption = captions_for(caption, num, caption_path)
    if m.num_classes and label_t is None:
        label_t = torch.arange(num, dtype=torch.long) % m.num_classes
    if cfg_scale != 1.0 and label_t is None and caption is None:
        raise ValueError(f"--cfg-scale {cfg_scale} needs labels or a caption to guide with: "
                         f"the model has num_classes=0 and caption_dim={m.caption_dim}, and no "
                         f"--caption was given (use --cfg-scale 1)")
    return num, label_t, caption


def sample_video(run_dir: Path, *, num: int | None, labels: list[int] | None,
                 caption_path: Path | None, cfg_scale: float, steps: int, shift: float,
                 seed: int, dtype: str) -> np.ndarray:
    """Float32 clips `[num, C, F, H, W]` sampled from RUN_DIR's DiT."""
    from safetensors.torch import load_file

    from mhla_dist.config import DiTConfig, load_config
    from mhla_dist.model.dit import DiT
    from mhla_dist.model.rectified_flow import euler_sample, sampling_times
    from mhla_dist.parallel import build_topology, destroy_topology

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
    if num is not None and num < 1:
        raise ValueError(f"--num {num} must be >= 1")
    cfg = load_config(run_dir / "config.yaml",
                      ["parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false"])
    if not isinstance(cfg.model, DiTConfig):
        raise ValueError(f"{run_dir} holds a {cfg.model.kind} model, not a DiT (kind 'dit')")
    m = cfg.model
    sampling_times(steps, shift=shift)  # bad steps / shift fail before the model is built
    num, label_t, caption = conditioning(m, num, labels, caption_path, cfg_scale)
    noise = torch.randn(num, m.in_channels, m.frames, m.height, m.width,
                        generator=torch.Generator().manual_seed(seed))
    build_topology()
    try:
        model = DiT(m)
        weights = run_dir / "model.safetensors"
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            raise ValueError(f"{weights} does not fit the DiT of {run_dir / 'config.yaml'}: "
                             f"{exc}") from None
        model.to(DTYPES[dtype]).eval()
        out = euler_sample(model, noise, label_t, steps, cfg_scale=cfg_scale, caption=caption,
                           shift=shift)
        return out.float().numpy()
    finally:
        destroy_topology()


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        samples = sample_video(args.run_dir, num=args.num, labels=args.labels,
                               caption_path=args.caption, cfg_scale=args.cfg_scale,
                               steps=args.steps, shift=args.shift, seed=args.seed,
                               dtype=args.dtype)
        npy, png = write_samples(samples, args.out or args.run_dir / "samples")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{npy}\n{png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
