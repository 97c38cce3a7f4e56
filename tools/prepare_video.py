"""Clips from `.npy` arrays or folders of frames (PNG/JPEG) -> clip shards.

    python tools/prepare_video.py --input clips/ --output data/video --frames 16 --size 64
    python tools/prepare_video.py --input a.npy b.npy --output data/v --frames 8 --size 32 \
        --label-from-parent

A clip is a `.npy` array `[F, H, W, C]` or `[F, H, W]` (uint8 or float), or a folder
whose image files are its frames in name order. Folders holding neither are searched
recursively. Each clip is sampled to `--frames` frames (evenly spaced; a shorter clip
repeats frames), its shorter side resized to `--size` and centre-cropped to a square,
then stored as uint8 (float inputs in [0, 1] are scaled; use `--keep-float` to store
float32). `--label-from-parent` labels a clip by its parent folder (classes in sorted
name order, written to `<prefix>.json`).

`--vae DIR` stores latents instead of pixels: the sampled frames (RGB; grey is repeated to
3 channels) are encoded by the local diffusers `AutoencoderKLWan` / `AutoencoderKL` folder
DIR (`mhla_dist.data.vae`; nothing is downloaded) in batches of `--vae-batch` clips on
`--device`, and each clip holds float32 `[C, F', H', W']` normalised latents. The frame
count and size are checked against the VAE first (Wan: `--frames` = 1 + 4k, `--size` a
multiple of its spatial compression); the summary prints the latent shape to set as
`model.in_channels, frames, height, width`.

    python tools/prepare_video.py --input clips/ --output data/wan --frames 17 --size 256 \
        --vae checkpoints/wan2.1-vae --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from mhla_dist.data import ShardSink, VideoVAE, clip_sample, load_vae

log = logging.getLogger("prepare_video")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_clips(paths: list[str]) -> list[Path]:
    """`.npy` files and frame folders under `paths`, in sorted order."""
    clips: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".npy":
            clips.append(p)
        elif p.is_dir():
            entries = sorted(p.iterdir())
            if any(e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
                clips.append(p)
            else:
                clips += find_clips([str(e) for e in entries if e.is_dir() or e.suffix == ".npy"])
        elif not p.exists():
            raise FileNotFoundError(f"--input {p}: no such file or folder")
    return clips


def load_clip(path: Path) -> np.ndarray:
    """`[F, H, W, C]` (uint8 or float) from a `.npy` or a folder of frames."""
    if path.is_dir():
        try:
            from PIL import Image
        except ImportError as exc:
            raise ImportError("reading PNG/JPEG frames needs Pillow (pip install pillow)") from exc
        frames = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames])
    else:
        arr = np.load(path, allow_pickle=False)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"{path}: a clip must be [F, H, W, C] or [F, H, W], got {arr.shape}")
    return arr


def resize_clip(clip: np.ndarray, frames: int, size: int, keep_float: bool) -> np.ndarray:
    """Evenly sample `frames` frames, resize the shorter side to `size`, centre-crop."""
    idx = np.linspace(0, clip.shape[0] - 1, frames).round().astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(clip[idx])).float().permute(0, 3, 1, 2)
    if clip.dtype != np.uint8 and not keep_float and float(x.max()) <= 1.0:
        x = x * 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].permute(0, 2, 3, 1)
    if keep_float:
        return x.contiguous().numpy().astype(np.float32)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous().numpy()


def vae_input(clip: np.ndarray) -> torch.Tensor:
    """uint8 frames `[F, H, W, C]` (C = 3, or 1 for grey) -> `[3, F, H, W]` in [-1, 1]."""
    if clip.shape[-1] not in (1, 3):
        raise ValueError(f"a VAE encodes RGB frames (3 channels, or 1 for grey), got "
                         f"{clip.shape[-1]} channels")
    x = torch.from_numpy(clip).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)
    return x.expand(3, -1, -1, -1).contiguous()


class LatentWriter:
    """Collects clips into batches of `batch` for the VAE and writes their latents."""

    def __init__(self, sink: ShardSink, vae: VideoVAE, batch: int):
        self.sink, self.vae, self.batch = sink, vae, batch
        self.pending: list[tuple[torch.Tensor, int | None, str]] = []

    def add(self, pixels: torch.Tensor, label: int | None, source: str) -> None:
        self.pending.append((pixels, label, source))
        if len(self.pending) == self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        latents = self.vae.encode(torch.stack([p for p, _, _ in self.pending])).numpy()
        for latent, (_, label, source) in zip(latents, self.pending, strict=True):
            self.sink.write(clip_sample(self.sink.summary.samples, latent, label, source=source))
        self.pending.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--input", nargs="+", required=True, help=".npy clips or folders")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--size", type=int, default=64, help="frame height and width")
    ap.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    ap.add_argument("--label-from-parent", action="store_true",
                    help="class label = index of the parent folder name")
    ap.add_argument("--keep-float", action="store_true", help="store float32, not uint8")
    ap.add_argument("--prefix", default="clips", help="shard file name prefix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--vae", metavar="DIR",
                    help="store VAE latents: a local diffusers AutoencoderKLWan / AutoencoderKL "
                         "folder")
    ap.add_argument("--vae-batch", type=int, default=8, help="clips per VAE encode call")
    ap.add_argument("--device", default="cpu", help="device the VAE runs on (cpu, cuda, ...)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="VAE weight dtype")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if min(args.frames, args.size) < 1:
        ap.error("--frames and --size must be >= 1")
    if args.vae and args.keep_float:
        ap.error("--keep-float stores float pixels; with --vae the clips are float32 latents")
    if args.vae_batch < 1:
        ap.error(f"--vae-batch {args.vae_batch} must be >= 1")

    clips = find_clips(args.input)
    if not clips:
        log.error("no clips (.npy or frame folders) in %s", args.input)
        return 1
    classes = sorted({c.parent.name for c in clips}) if args.label_from_parent else []
    meta = {"kind": "video", "classes": classes,
            "clip_shape": [args.frames, args.size, args.size, 3]}
    shape = f"[{args.frames}, {args.size}, {args.size}, C]"
    vae = None
    if args.vae:
        vae = load_vae(args.vae, device=args.device, dtype=DTYPES[args.dtype])
        try:
            latent = vae.latent_shape(args.frames, args.size, args.size)
        except ValueError as exc:
            ap.error(f"--frames {args.frames} --size {args.size} do not fit the VAE in "
                     f"{args.vae}: {exc}")
        log.info("clips [%d, %d, %d, 3] -> latents [C, F', H', W'] = %s", args.frames,
                 args.size, args.size, list(latent))
        meta["clip_shape"] = list(latent)
        meta["vae"] = {"path": str(args.vae), "kind": vae.kind}
        shape = (f"{list(latent)} latents (model.in_channels={latent[0]} frames={latent[1]} "
                 f"height={latent[2]} width={latent[3]})")
    failed = 0
    channels: set[int] = set()
    with ShardSink(args.output, args.prefix, maxcount=args.shard_size, meta=meta) as sink, \
            Progress(disable=args.quiet) as progress:
        latents = LatentWriter(sink, vae, args.vae_batch) if vae is not None else None
        task = progress.add_task("clips", total=len(clips))
        for path in clips:
            try:
                clip = resize_clip(load_clip(path), args.frames, args.size, args.keep_float)
                pixels = vae_input(clip) if latents is not None else None
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                failed += 1
                progress.advance(task)
                continue
            label = classes.index(path.parent.name) if classes else None
            if latents is not None:
                latents.add(pixels, label, str(path))
            else:
                channels.add(clip.shape[-1])
                sink.write(clip_sample(sink.summary.samples, clip, label, source=str(path)))
            progress.advance(task)
        if latents is not None:
            latents.flush()
    s = sink.summary
    if len(channels) > 1:
        log.warning("clips have different channel counts %s: a batch needs one shape",
                    sorted(channels))
    print(f"clips: {s.samples}  skipped: {failed}  shards: {len(s.shards)}  shape: "
          f"{shape}\nloader pattern: {s.pattern}")
    return 0 if s.samples else 1


if __name__ == "__main__":
    sys.exit(main())
