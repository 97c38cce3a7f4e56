"""Passkey retrieval (mhla_dist/eval/passkey.py): the prompts (the key at its depth, the
length exact), the scoring against models forced right or wrong, and the real greedy
recurrent decode against a greedy loop over full forwards."""

from __future__ import annotations

import re

import pytest
import torch

from mhla_dist.data import ByteTokenizer
from mhla_dist.eval.passkey import (
    ANSWER_TOKENS,
    FILLER,
    FIXED_TOKENS,
    NEEDLE,
    QUESTION,
    passkey_accuracy,
    passkey_prompt,
    score_answer,
)
from tests.eval.lm_runs import load_run_model, make_lm_run, single_process

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    run = make_lm_run(tmp_path_factory.mktemp("passkey") / "tiny")
    with single_process():
        yield load_run_model(run)


@pytest.mark.parametrize("length", [FIXED_TOKENS, 128, 500, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_holds_the_key_at_its_depth_and_has_the_length(length, depth):
    key = "40517"
    prompt, at = passkey_prompt(key, length, depth)
    assert len(TOK.encode(prompt)) == len(prompt) == length - ANSWER_TOKENS
    needle = NEEDLE.format(key=key)
    assert prompt.index(needle) == at and prompt.count(key) == 2
    assert prompt.endswith("\n" + QUESTION)
    room = length - FIXED_TOKENS
    before, after = prompt[:at - 1], prompt[at + len(needle) + 1:-len(QUESTION) - 1]
    assert len(before) == round(depth * room) and len(before) + len(after) == room
    stream = " ".join([FILLER] * (room // len(FILLER) + 1))
    assert stream.startswith(before) and stream.startswith(after)


def test_prompts_refuse_bad_values():
    with pytest.raises(ValueError, match=f"length=50 is below the {FIXED_TOKENS} tokens"):
        passkey_prompt("12345", 50, 0.5)
    with pytest.raises(ValueError, match="depth=1.5 must be a fraction"):
        passkey_prompt("12345", 200, 1.5)
    with pytest.raises(ValueError, match="key='123' must be 5 digits"):
        passkey_prompt("123", 200, 0.5)


def test_score_answer():
    assert score_answer(" 12345", "12345") == (True, 5)
    assert score_answer("12345\n", "12345") == (True, 5)
    assert score_answer(" 12395", "12345") == (False, 4)
    assert score_answer(" 123", "12345") == (False, 3)
    assert score_answer(" abcde", "12345") == (False, 0)


def answering(answer):
    """A `generate` that reads the key out of each prompt and writes `answer(key)`."""
    calls = []

    def generate(prompt, max_new_tokens, *, temperature=1.0, **_):
        calls.append((prompt.shape, max_new_tokens, temperature))
        rows = []
        for row in prompt:
            key = re.search(r"The pass key is (\d{5})\.", TOK.decode(row.tolist())).group(1)
            text = answer(key)[:max_new_tokens]
            rows.append(torch.cat([row, torch.tensor(TOK.encode(text).astype("int64"))]))
        return torch.stack(rows)

    return generate, calls


@pytest.mark.parametrize("answer, exact, digits", [
    (lambda k: " " + k, 1.0, 1.0),
    (lambda k: " " + "".join(str((int(c) + 1) % 10) for c in k), 0.0, 0.0),
    (lambda k: " " + k[:3] + "".join(str((int(c) + 1) % 10) for c in k[3:]), 0.0, 0.6),
], ids=["right", "wrong", "three_digits"])
def test_accuracy_of_forced_models(model, monkeypatch, answer, exact, digits):
    generate, calls = answering(answer)
    monkeypatch.setattr(model, "generate", generate)
    res = passkey_accuracy(model, lengths=[104, 128], depths=[0, 0.5, 1], trials=4, seed=3)
    assert res["accuracy"] == [[exact] * 3] * 2
    assert res["digit_accuracy"] == [[pytest.approx(digits)] * 3] * 2
    assert res["mean_accuracy"] == exact and len(res["keys"]) == 4
    # every trial of a cell in one batch, prompt + answer = the length, greedy
    assert calls == [(torch.Size([4, n - ANSWER_TOKENS]), ANSWER_TOKENS, 0.0)
                     for n in (104, 128) for _ in range(3)]


def test_keys_are_seeded(model, monkeypatch):
    monkeypatch.setattr(model, "generate", answering(lambda k: " " + k)[0])
    a, b, c = (passkey_accuracy(model, lengths=[104], depths=[0], trials=5, seed=s)["keys"]
               for s in (0, 0, 1))
    assert a == b != c and all(len(k) == 5 and k.isdigit() for k in a)


def test_real_decode_is_greedy_over_the_prompt(model):
    res = passkey_accuracy(model, lengths=[128], depths=[0.5], trials=2, seed=0)
    cell = res["cells"][0]
    for key, got in zip(res["keys"], cell["answers"], strict=True):
        ids = torch.tensor(TOK.encode(passkey_prompt(key, 128, 0.5)[0]).astype("int64"))[None]
        with torch.no_grad():
            for _ in range(ANSWER_TOKENS):  # greedy by full parallel forwards
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        assert got == TOK.decode(ids[0, -ANSWER_TOKENS:].tolist())
    assert 0.0 <= cell["accuracy"] <= cell["digit_accuracy"] <= 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[256]), r"lengths \[256\] exceed model.max_seq_len=128"),
    (dict(lengths=[64]), rf"lengths \[64\] are below {FIXED_TOKENS} tokens"),
    (dict(depths=[-0.1, 2]), r"depths \[-0.1, 2.0\] must be fractions in \[0, 1\]"),
    (dict(trials=0), "trials=0 must be >= 1"),
], ids=["too_long", "too_short", "depth", "trials"])
def test_bad_settings_are_named(model, kwargs, message):
    args = {"lengths": [128], "depths": [0.5], "trials": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        passkey_accuracy(model, **args)
