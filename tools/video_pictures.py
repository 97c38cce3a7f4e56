"""The pictures of sampled clips (`tools/sample_video.py`): the frame grid, the labelled
grid for people and the animated GIF, and writing them with the samples."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

GAP = 2  # pixels between the frames (rows, GIF clips) of the pictures for people
LABEL_H = 14  # the strip of text above the labelled grid's frames and the GIF's clips
AUTO_ZOOM_PX = 128  # --zoom 0: the smallest zoom that makes a clip this many pixels


def clip_pixels(samples: np.ndarray) -> np.ndarray:
    """`[num, C, F, H, W]` in [-1, 1] -> uint8 `[num, F, H, W, 3]` (C == 3) or
    `[num, F, H, W]` (the first channel)."""
    x = samples if samples.shape[1] == 3 else samples[:, :1]
    pixels = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)
    pixels = pixels.transpose(0, 2, 3, 4, 1)  # [num, F, H, W, C]
    return pixels if samples.shape[1] == 3 else pixels[..., 0]


def clip_frames_to_grid(samples: np.ndarray) -> np.ndarray:
    """`[num, C, F, H, W]` in [-1, 1] -> uint8 `[num*H, F*W, 3]` (C == 3) or `[num*H, F*W]`
    (the first channel): row n is sample n, column f its frame f."""
    pixels = clip_pixels(samples)
    n, f, h, w = pixels.shape[:4]
    return pixels.swapaxes(1, 2).reshape(n * h, f * w, *pixels.shape[4:])  # [n,H,F,W(,C)]


def auto_zoom(height: int, width: int) -> int:
    return max(1, -(-AUTO_ZOOM_PX // max(height, width)))


def check_class_names(num_classes: int, class_names: list[str] | None) -> None:
    if class_names is None:
        return
    if num_classes == 0:
        raise ValueError("--class-names given, but the model has num_classes=0 (no class "
                         "conditioning): drop --class-names")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} --class-names ({' '.join(class_names)}) for a "
                         f"model of num_classes={num_classes}: give one name per class")


def row_names(num: int, num_classes: int, labels: list[int] | None,
              class_names: list[str] | None) -> list[str]:
    """What each sample is, for the pictures: its class's name (or `class L`; `null` for
    the null class), or `sample N` for a model without classes. Default labels cycle
    through the classes, as `conditioning` draws them."""
    if num_classes == 0:
        return [f"sample {i}" for i in range(num)]
    labels = labels if labels is not None else [i % num_classes for i in range(num)]
    return ["null" if v == num_classes else class_names[v] if class_names else f"class {v}"
            for v in labels]


def _zoomed(pixels: np.ndarray, zoom: int) -> np.ndarray:
    """Nearest-neighbour upscaling of `[num, F, H, W(, 3)]` along H and W."""
    return pixels.repeat(zoom, axis=2).repeat(zoom, axis=3)


@functools.cache
def _font():
    from PIL import ImageFont

    return ImageFont.load_default()  # FreeType when Pillow has it, else a bitmap font


def _text(draw, center: tuple[float, float], text: str) -> None:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font())
    draw.text((center[0] - (x0 + x1) / 2, center[1] - (y0 + y1) / 2), text, fill=0,
              font=_font())


def labelled_grid(samples: np.ndarray, names: list[str], zoom: int):
    """The PIL image of `samples_labelled.png`: white margins and gaps, black text; the
    frame of sample n, frame f starts LABEL_H + n (H zoom + GAP) pixels down and ends
    (F - 1 - f) (W zoom + GAP) pixels before the right edge."""
    from PIL import Image, ImageDraw

    pixels = _zoomed(clip_pixels(samples), zoom)
    n, f, h, w = pixels.shape[:4]
    mode = "RGB" if pixels.ndim == 5 else "L"
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    name_w = 4 * GAP + max(int(np.ceil(probe.textlength(s, font=_font()))) for s in names)
    image = Image.new(mode, (name_w + f * (w + GAP) - GAP, LABEL_H + n * (h + GAP) - GAP),
                      "white")
    draw = ImageDraw.Draw(image)
    for j in range(f):
        _text(draw, (name_w + j * (w + GAP) + w / 2, LABEL_H / 2), f"frame {j}" if w >= 48
              else str(j))
    for i in range(n):
        top = LABEL_H + i * (h + GAP)
        _text(draw, (name_w / 2, top + h / 2), names[i])
        for j in range(f):
            image.paste(Image.fromarray(pixels[i, j]), (name_w + j * (w + GAP), top))
    return image


def gif_frames(samples: np.ndarray, names: list[str], zoom: int) -> list:
    """The PIL images of `samples.gif`, one per clip frame: every sample's frame side by
    side (sample n from n (W zoom + GAP) pixels across), its name in the strip above."""
    from PIL import Image, ImageDraw

    pixels = _zoomed(clip_pixels(samples), zoom)
    n, f, h, w = pixels.shape[:4]
    mode = "RGB" if pixels.ndim == 5 else "L"
    frames = []
    for j in range(f):
        image = Image.new(mode, (n * (w + GAP) - GAP, LABEL_H + h), "white")
        draw = ImageDraw.Draw(image)
        for i in range(n):
            _text(draw, (i * (w + GAP) + w / 2, LABEL_H / 2), names[i])
            image.paste(Image.fromarray(pixels[i, j]), (i * (w + GAP), LABEL_H))
        frames.append(image)
    return frames


def _replace_into(path: Path, write) -> None:
    """Write through a temporary name and rename, so a reader never sees a half file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(samples: np.ndarray, out: Path, names: list[str] | None = None,
                  zoom: int = 0, fps: float = 4.0,
                  frames: np.ndarray | None = None) -> list[Path]:
    """Write `samples.npy` (the model's output), `samples.png`, `samples_labelled.png` and
    `samples.gif` (`tools/sample_video.py`'s docstring) into `out`; their paths. The
    pictures show `frames` (e.g. latents decoded by a VAE, `[num, 3, F', H', W']` in
    [-1, 1]; default the samples themselves). `names`: one per sample (default
    `sample N`); `zoom` 0: `auto_zoom`."""
    from PIL import Image

    npy = out / "samples.npy"
    out.mkdir(parents=True, exist_ok=True)
    _replace_into(npy, lambda fh: np.save(fh, samples.astype(np.float32)))
    samples = samples if frames is None else frames
    n, _, f, h, w = samples.shape
    names = names if names is not None else [f"sample {i}" for i in range(n)]
    zoom = zoom or auto_zoom(h, w)
    png, labelled, gif = out / "samples.png", out / "samples_labelled.png", out / "samples.gif"
    image = Image.fromarray(clip_frames_to_grid(samples))
    _replace_into(png, lambda fh: image.save(fh, format="PNG"))
    grid = labelled_grid(samples, names, zoom)
    _replace_into(labelled, lambda fh: grid.save(fh, format="PNG"))
    first, *rest = gif_frames(samples, names, zoom)
    # Identical consecutive frames are merged by Pillow (a still clip is one GIF frame).
    _replace_into(gif, lambda fh: first.save(fh, format="GIF", save_all=True,
                                             append_images=rest, loop=0,
                                             duration=round(1000 / fps)))
    return [npy, png, labelled, gif]
