"""Procedurally generated moving-shape clips with class labels -> clip shards.

    python tools/make_synthetic_video.py --output data/shapes --num-clips 512 --frames 16 --size 64

Each clip shows one shape (square, disc, triangle, ring: the label) moving and bouncing
over a noisy background; uint8 `[frames, size, size, 3]`. Deterministic in `--seed`.
`--radius MIN MAX` draws each shape's radius from that range of frame sizes (default
0.12 0.22; the video quickstart uses 0.2 0.32, where a 16-pixel ring is still a ring).
`--caption-dim D` adds a caption embedding float32 `[D]` per clip (`emb.npy`: its class's
prototype vector plus a little noise), for caption-conditioned DiTs; with `--text-tokens L`
it is caption tokens float32 `[l, D]`, `l <= L` (filler words and the class word), for
DiTs that cross-attend to text (`model.text_dim: D`, `model.text_len: L`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mhla_dist.data import write_synthetic_video
from mhla_dist.data.synthetic_video import DEFAULT_RADIUS, check_radius


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--num-clips", type=int, required=True)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="frame height and width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    ap.add_argument("--caption-dim", type=int, default=0,
                    help="width of a caption embedding per clip (0: no captions)")
    ap.add_argument("--radius", type=float, nargs=2, default=list(DEFAULT_RADIUS),
                    metavar=("MIN", "MAX"),
                    help="the shapes' radius range as fractions of --size (default "
                         f"{DEFAULT_RADIUS[0]} {DEFAULT_RADIUS[1]})")
    ap.add_argument("--text-tokens", type=int, default=0,
                    help="caption tokens per clip, at most (0: one pooled vector; needs "
                         "--caption-dim)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if min(args.num_clips, args.frames, args.size) < 1:
        ap.error("--num-clips, --frames and --size must be >= 1")
    if args.caption_dim < 0:
        ap.error(f"--caption-dim {args.caption_dim} must be >= 0 (0: no captions)")
    if args.text_tokens < 0 or (args.text_tokens and not args.caption_dim):
        ap.error(f"--text-tokens {args.text_tokens} must be >= 0 and needs --caption-dim > 0 "
                 "(the width of each token)")
    try:
        check_radius(args.radius)
    except ValueError as exc:
        ap.error(f"--radius {args.radius[0]} {args.radius[1]}: {exc}")
    s = write_synthetic_video(args.output, num_clips=args.num_clips, frames=args.frames,
                              size=args.size, seed=args.seed, clips_per_shard=args.shard_size,
                              caption_dim=args.caption_dim, text_tokens=args.text_tokens,
                              radius=tuple(args.radius))
    captions = f"  captions: [{args.caption_dim}]" if args.caption_dim else ""
    if args.text_tokens:
        captions = f"  caption tokens: [<={args.text_tokens}, {args.caption_dim}]"
    print(f"clips: {s.samples}  shards: {len(s.shards)}  shape: "
          f"[{args.frames}, {args.size}, {args.size}, 3]{captions}\nloader pattern: {s.pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
