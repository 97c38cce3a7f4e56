"""Passkey retrieval (Mohtashami & Jaggi, Landmark Attention, 2023; as LongLoRA runs it).

A prompt of filler text with one needle, then the question:

    <filler[:p]>\\n<needle>\\n<filler[:F - p]>\\n<question>

`FILLER` repeated (joined by spaces) and cut to the bytes it needs, both pieces from its
start as in Landmark Attention; `NEEDLE` holds a 5-digit key; `p = round(depth * F)`, so
depth 0 puts the needle first and depth 1 right before the question. The byte tokenizer
makes every character one token. A trial of `length` tokens is the prompt plus the
`ANSWER_TOKENS` the model greedily generates (" NNNNN" when right), so `length <=
model.max_seq_len`. Score: the first 5 characters of the answer after leading whitespace
against the key: exact match, and the fraction of digits right in place.

The same `trials` keys (seeded) go into every (length, depth) cell, so cells differ only
in where the key sits and how much filler surrounds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mhla_dist.data import ByteTokenizer

log = logging.getLogger(__name__)

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
ANSWER_TOKENS = KEY_DIGITS + 1  # the space, then the digits
# Everything but the filler: the needle, the question, three newlines and the answer.
FIXED_TOKENS = len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + 3 + ANSWER_TOKENS
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_passkey(lengths: Sequence[int], depths: Sequence[float], trials: int,
                  max_seq_len: int) -> None:
    """Raise `ValueError` naming every bad setting."""
    bad = []
    if not lengths:
        bad.append("no lengths given")
    short = [n for n in lengths if n < FIXED_TOKENS]
    if short:
        bad.append(f"lengths {short} are below {FIXED_TOKENS} tokens, what the needle, the "
                   f"question and the {ANSWER_TOKENS}-token answer take without filler")
    long = [n for n in lengths if n > max_seq_len]
    if long:
        bad.append(f"lengths {long} exceed model.max_seq_len={max_seq_len} (a length counts "
                   f"the prompt and the {ANSWER_TOKENS} generated tokens)")
    if not depths:
        bad.append("no depths given")
    off = [d for d in depths if not 0.0 <= d <= 1.0]
    if off:
        bad.append(f"depths {off} must be fractions in [0, 1]")
    if trials < 1:
        bad.append(f"trials={trials} must be >= 1")
    if bad:
        raise ValueError("; ".join(bad))


def passkey_prompt(key: str, length: int, depth: float) -> tuple[str, int]:
    """`(prompt, needle_at)`: the prompt of a `length`-token trial (`length -
    ANSWER_TOKENS` characters, all ASCII) and the character offset of its needle."""
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ValueError(f"key={key!r} must be {KEY_DIGITS} digits")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be a fraction in [0, 1]")
    room = length - FIXED_TOKENS
    if room < 0:
        raise ValueError(f"length={length} is below the {FIXED_TOKENS} tokens a trial needs "
                         "without filler")
    filler = " ".join([FILLER] * (room // len(FILLER) + 1))
    p = round(depth * room)
    prompt = "\n".join([filler[:p], NEEDLE.format(key=key), filler[:room - p], QUESTION])
    return prompt, p + 1


def score_answer(answer: str, key: str) -> tuple[bool, int]:
    """`(exact, digits right)`: the first `KEY_DIGITS` characters after leading whitespace
    against `key`, in place."""
    got = answer.lstrip()[:KEY_DIGITS]
    right = sum(a == b for a, b in zip(got, key, strict=False))
    return right == KEY_DIGITS and len(got) == KEY_DIGITS, right


def draw_keys(trials: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS, trials)]


@torch.no_grad()
def passkey_accuracy(model, *, lengths: Sequence[int], depths: Sequence[float] = DEPTHS,
                     trials: int = 10, seed: int = 0, device: str | torch.device = "cpu"
                     ) -> dict[str, Any]:
    """Exact and per-digit accuracy for every (length, depth), greedy decoding with the
    model's recurrent state (`model.generate`, temperature 0), all trials of a cell in
    one batch. `accuracy[i][j]` is length `i`, depth `j`."""
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    check_passkey(lengths, depths, trials, model.cfg.max_seq_len)
    if model.cfg.vocab_size < 256:
        raise ValueError(f"model.vocab_size={model.cfg.vocab_size} cannot hold the byte "
                         "tokens (256) the passkey prompts are written in")
    model.to(device).eval()
    tok, keys = ByteTokenizer(), draw_keys(trials, seed)
    cells, exact, digits = [], [], []
    for length in lengths:
        exact.append([])
        digits.append([])
        for depth in depths:
            prompts = [passkey_prompt(k, length, depth) for k in keys]
            ids = torch.tensor(np.stack([tok.encode(p) for p, _ in prompts]).astype(np.int64),
                               device=device)
            out = model.generate(ids, ANSWER_TOKENS, temperature=0.0)
            answers = [tok.decode(row[ids.shape[1]:].tolist()) for row in out.cpu()]
            scores = [score_answer(a, k) for a, k in zip(answers, keys, strict=True)]
            acc = sum(s[0] for s in scores) / trials
            dig = sum(s[1] for s in scores) / (trials * KEY_DIGITS)
            exact[-1].append(acc)
            digits[-1].append(dig)
            cells.append({"length": length, "depth": depth, "needle_at": prompts[0][1],
                          "accuracy": acc, "digit_accuracy": dig,
                          "answers": answers})
            log.info("passkey length %d depth %.2f: accuracy %.2f, digits %.2f",
                     length, depth, acc, dig)
    return {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
            "keys": keys, "accuracy": exact, "digit_accuracy": digits,
            "mean_accuracy": float(np.mean(exact)), "cells": cells}


def passkey_table(result: dict[str, Any]) -> str:
    """Exact accuracy (fraction of digits right in parentheses), lengths x depths."""
    head = f"{'length':>8}" + "".join(f"{f'depth {d:g}':>15}" for d in result["depths"])
    lines = [f"passkey retrieval ({result['trials']} keys per cell): exact (digits)", head,
             "-" * len(head)]
    for i, n in enumerate(result["lengths"]):
        cells = "".join(f"{f'{a:.2f} ({g:.2f})':>15}" for a, g in
                        zip(result["accuracy"][i], result["digit_accuracy"][i], strict=True))
        lines.append(f"{n:>8}{cells}")
    lines.append(f"mean exact accuracy: {result['mean_accuracy']:.3f}")
    return "\n".join(lines)
