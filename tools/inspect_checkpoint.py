"""Print what a checkpoint holds: tensor tree, shapes, dtypes, parameter counts, the model
config and the Mc (mixing) matrices' statistics.

    python tools/inspect_checkpoint.py runs/tiny/model.safetensors
    python tools/inspect_checkpoint.py runs/tiny/checkpoints/step00001000
    python tools/inspect_checkpoint.py runs/tiny/checkpoints --tag step00000500

A DeepSpeed checkpoint folder is consolidated in memory first (full, TP-merged shapes).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from mhla_dist.convert.inspection import describe
from mhla_dist.convert.model_spec import ConversionError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a .safetensors file or a DeepSpeed checkpoint folder")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        text = describe(args.path, args.tag)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
