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

from mhla_dist.data import ShardSink, clip_sample

log = logging.getLogger("prepare_video")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if min(args.frames, args.size) < 1:
        ap.error("--frames and --size must be >= 1")

    clips = find_clips(args.input)
    if not clips:
        log.error("no clips (.npy or frame folders) in %s", args.input)
        return 1
    classes = sorted({c.parent.name for c in clips}) if args.label_from_parent else []
    meta = {"kind": "video", "classes": classes,
            "clip_shape": [args.frames, args.size, args.size, 3]}
    failed = 0
    channels: set[int] = set()
    with ShardSink(args.output, args.prefix, maxcount=args.shard_size, meta=meta) as sink, \
            Progress(disable=args.quiet) as progress:
        task = progress.add_task("clips", total=len(clips))
        for path in clips:
            try:
                clip = resize_clip(load_clip(path), args.frames, args.size, args.keep_float)
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                failed += 1
                progress.advance(task)
                continue
            channels.add(clip.shape[-1])
            label = classes.index(path.parent.name) if classes else None
            sink.write(clip_sample(sink.summary.samples, clip, label, source=str(path)))
            progress.advance(task)
    s = sink.summary
    if len(channels) > 1:
        log.warning("clips have different channel counts %s: a batch needs one shape",
                    sorted(channels))
    print(f"clips: {s.samples}  skipped: {failed}  shards: {len(s.shards)}  shape: "
          f"[{args.frames}, {args.size}, {args.size}, C]\nloader pattern: {s.pattern}")
    return 0 if s.samples else 1


if __name__ == "__main__":
    sys.exit(main())
