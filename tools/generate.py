"""Sample text from a trained byte-level MHLA LM's consolidated weights.

    python tools/generate.py runs/quickstart --prompt "The for statement" --max-new-tokens 200

Loads RUN_DIR/model.safetensors and RUN_DIR/config.yaml, builds the model in this one
process (any training layout: the weights are consolidated) and decodes with the
recurrent MHLA state.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch


def generate(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float,
             top_k: int | None, seed: int) -> str:
    from mhla_dist.data import ByteTokenizer
    from mhla_dist.eval.runs import loaded_lm

    with loaded_lm(run_dir) as (cfg, model):
        tok = ByteTokenizer()
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
        room = cfg.model.max_seq_len - ids.shape[1]
        out = model.generate(ids, min(max_new_tokens, room), temperature=temperature,
                             top_k=top_k, generator=torch.Generator().manual_seed(seed))
        return tok.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        print(generate(args.run_dir, args.prompt, args.max_new_tokens, args.temperature,
                       args.top_k, args.seed))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
