"""`python -m mhla_dist.train --config CONFIG.yaml [key=value ...]`.

Runs alone (one process), under `torchrun`, or under the `deepspeed` launcher: the
process group comes from the launcher's environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from mhla_dist.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mhla_dist.train", description=__doc__)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron's optional extras
    # Our collectives use torch 2.13's names; DeepSpeed 0.19's ZeRO still calls the old
    # ones, and torch repeats its FutureWarning for them every few steps.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                r"deprecated")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .trainer import PREEMPTED_EXIT_CODE, Trainer

    status = Trainer(cfg).train()
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
