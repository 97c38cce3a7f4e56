"""Parameters, FLOPs and per-rank training memory of a configured model, without building it.

    python tools/model_summary.py --config configs/lm/1.3b.yaml parallel.tp=2 parallel.cp=4
    python tools/model_summary.py --config configs/lm/7b.yaml zero.stage=3 --world-size 64 --json

The model is built on the meta device; the memory model is in mhla_dist/model/summary.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from mhla_dist.config import ConfigError, load_config
from mhla_dist.model.summary import summarize


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a run or preset YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks in all (default tp x cp, i.e. one data-parallel replica)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron's optional-extra notes
    try:
        cfg = load_config(args.config, args.overrides)
        summary = summarize(cfg, args.world_size)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    lay = summary.layout
    print(f"model         {summary.kind}: {_human(summary.parameters)} parameters, "
          f"{_human(summary.parameters_per_rank)} per rank")
    print(f"layout        world {lay['world']} = dp {lay['dp']} x cp {lay['cp']} x tp "
          f"{lay['tp']}, ZeRO stage {lay['zero_stage']}")
    if summary.flops_per_token is not None:
        print(f"FLOPs/token   {_human(summary.flops_per_token)} (training step)")
    print(f"FLOPs/sample  {_human(summary.flops_per_sample)} ({summary.tokens_per_sample} "
          "tokens)")
    print("memory/rank   " + ", ".join(f"{k} {_human(v, 'B')}"
                                        for k, v in summary.memory_per_rank.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
