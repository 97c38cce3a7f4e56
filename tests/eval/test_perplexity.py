"""Loss by position (mhla_dist/eval/perplexity.py) on a tiny run against independent
computations: bucket sums against `model.loss` and against the logits' cross-entropy
per column range, per-document positions against a loop over the doc ids; and
tools/eval_lm.py run as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mhla_dist.data import IGNORE_INDEX, shift_tokens
from mhla_dist.eval.perplexity import held_out_batches, perplexity_by_position
from mhla_dist.eval.runs import read_lm_config
from mhla_dist.model.lm import token_loss
from tests.eval.lm_runs import load_run_model, make_lm_run, single_process
from tests.train.launching import ROOT, launch_env
from tools import eval_lm

N, BATCHES, ROWS = 128, 3, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return make_lm_run(tmp / "tiny"), make_lm_run(tmp / "other", seed=1)


@pytest.fixture(scope="module")
def run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def model(run):
    with single_process():
        yield load_run_model(run)


def windows(run):
    return list(held_out_batches(str(read_lm_config(run).data.eval), seq_len=N,
                                 batch_size=ROWS, vocab_size=257))[:BATCHES]


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every input within its document, restarting at every row (a loop)."""
    pos = torch.zeros_like(doc_ids)
    for b in range(doc_ids.shape[0]):
        for t in range(1, doc_ids.shape[1]):
            same = doc_ids[b, t] == doc_ids[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
    return pos


@pytest.mark.parametrize("per_document", [False, True], ids=["plain", "per_document"])
def test_buckets_add_up_to_model_loss_of_the_same_windows(run, model, per_document):
    res = perplexity_by_position(model, windows(run), seq_len=N, bucket=48,
                                 per_document=per_document, max_batches=BATCHES)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows(run):
            b = shift_tokens(batch, document_masking=per_document)
            s, c = model.loss(b["input_ids"], b["labels"], IGNORE_INDEX, b.get("cu_seqlens"))
            total, count = total + float(s), count + int(c)
    rows = res["buckets"]
    assert [(r["start"], r["stop"]) for r in rows] == [(0, 48), (48, 96), (96, 128)]
    assert res["tokens"] == count == sum(r["tokens"] for r in rows)
    assert res["batches"] == BATCHES
    assert res["loss"] == pytest.approx(total / count, rel=1e-5)
    weighted = sum(r["loss"] * r["tokens"] for r in rows if r["tokens"]) / count
    assert weighted == pytest.approx(res["loss"], rel=1e-9)
    for r in rows:
        assert r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)


def test_plain_buckets_are_the_loss_of_their_columns(run, model):
    res = perplexity_by_position(model, windows(run), seq_len=N, bucket=32,
                                 max_batches=BATCHES)
    sums, counts = [0.0] * 4, [0] * 4
    with torch.no_grad():
        for batch in windows(run):
            b = shift_tokens(batch, document_masking=False)
            logits = model(b["input_ids"])  # no cu_seqlens: the context crosses documents
            for i in range(4):
                cols = slice(32 * i, 32 * (i + 1))
                s, c = token_loss(logits[:, cols], b["labels"][:, cols])
                sums[i], counts[i] = sums[i] + float(s), counts[i] + int(c)
    for r, s, c in zip(res["buckets"], sums, counts, strict=True):
        assert r["tokens"] == c
        assert r["loss"] == pytest.approx(s / c, rel=1e-5)
    losses = [r["loss"] for r in res["buckets"]]
    assert max(losses) - min(losses) > 1e-3  # the check above can tell buckets apart


def test_per_document_positions_start_at_every_document(run, model):
    """bucket=1: bucket p holds exactly the targets at document position p, so bucket 0
    counts every document start (each row start too) whose target is scored."""
    res = perplexity_by_position(model, windows(run), seq_len=N, bucket=1,
                                 per_document=True, max_batches=BATCHES)
    want = torch.zeros(N, dtype=torch.int64)
    starts = 0
    for batch in windows(run):
        b = shift_tokens(batch, document_masking=True)
        pos = doc_positions(b["doc_ids"])
        keep = b["labels"] != IGNORE_INDEX
        want += torch.bincount(pos[keep], minlength=N)
        starts += int(((pos == 0) & keep).sum())
        assert (pos == 0).sum() == b["cu_seqlens"].numel() - 1  # one start per document
    got = torch.tensor([r["tokens"] for r in res["buckets"]])
    assert torch.equal(got, want)
    assert got[0] == starts > BATCHES * ROWS  # documents start inside windows too
    plain = perplexity_by_position(model, windows(run), seq_len=N, bucket=1,
                                   max_batches=BATCHES)
    assert plain["buckets"][0]["tokens"] == BATCHES * ROWS  # only the row starts


@pytest.mark.parametrize("kwargs, message", [
    (dict(bucket=0), "bucket=0 must be >= 1"),
    (dict(seq_len=256), "seq_len=256 must be in [1, model.max_seq_len=128]"),
    (dict(max_batches=0), "batches=0 must be >= 1"),
], ids=["bucket", "seq_len", "batches"])
def test_bad_settings_are_named(model, kwargs, message):
    args = {"seq_len": N, "bucket": 32, "max_batches": 1, **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        perplexity_by_position(model, iter(()), **args)


def test_windows_of_another_length_are_refused(run, model):
    with pytest.raises(ValueError, match="64-token windows; expected seq_len=128"):
        perplexity_by_position(model, iter([{"tokens": torch.zeros(1, 65, dtype=torch.long),
                                             "doc_ids": torch.zeros(1, 65, dtype=torch.long)}]),
                               seq_len=N)


def test_cli_writes_both_evaluations_for_compared_runs(runs, tmp_path):
    run, other = runs
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "tools/eval_lm.py", str(run), "--compare", str(other), "--out",
         str(out), "--batches", "2", "--batch-size", "2", "--bucket", "32", "--trials", "2",
         "--lengths", "104,128", "--depths", "0,1"],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loss by position" in proc.stdout and "passkey retrieval" in proc.stdout
    ppl = json.loads((out / "perplexity_by_position.json").read_text())["runs"]
    keys = json.loads((out / "passkey.json").read_text())["runs"]
    assert sorted(ppl) == sorted(keys) == ["other", "tiny"]
    assert len(ppl["tiny"]["buckets"]) == 4 and ppl["tiny"]["batches"] == 2
    assert keys["tiny"]["lengths"] == [104, 128] and keys["tiny"]["depths"] == [0.0, 1.0]
    assert ppl["tiny"]["loss"] != ppl["other"]["loss"]  # the second run's own weights
    for name in ("perplexity_by_position.png", "passkey.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_cli_refuses_bad_values_before_loading(run, capsys):
    assert eval_lm.main([str(run), "--perplexity", "--bucket", "0"]) == 2
    assert "bucket=0 must be >= 1" in capsys.readouterr().err
    assert eval_lm.main([str(run), "--passkey", "--lengths", "512"]) == 2
    assert "lengths [512] exceed model.max_seq_len=128" in capsys.readouterr().err
    assert eval_lm.main([str(run.parent / "missing")]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
