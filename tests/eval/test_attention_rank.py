"""The attention-rank diagnostic (`mhla_dist/eval/attention_rank.py`): its matrix is the
operator's (`operator_matrix(A) @ v == mhla_reference`), the identities of DESIGN §1, the
rank bounds of linear attention and MHLA, the metrics on matrices whose answer is known,
and `tools/attention_rank.py` on a tiny hybrid LM run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhla_dist.eval.attention_rank import (
    effective_rank,
    linear_matrix,
    mhla_matrix,
    numerical_rank,
    operator_matrix,
    row_entropy,
    select,
    shard_windows,
    softmax_matrix,
)
from mhla_kernels import mhla_reference
from tests.numerics import rel_err
from tests.train.runs import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def features(n: int, d: int, seed: int = 0, heads: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if heads is None else (1, n, heads, d)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) + 1e-3 for _ in range(3))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_mixing_of_ones_is_linear_attention(causal):
    q, k, _ = features(63, 8)
    a = mhla_matrix(q, k, torch.ones(4, 4, dtype=torch.float64), 16, causal=causal)
    assert rel_err(a, linear_matrix(q, k, causal=causal)) < 1e-14


def test_identity_mixing_is_block_diagonal():
    q, k, _ = features(63, 8)
    a = mhla_matrix(q, k, torch.eye(4, dtype=torch.float64), 16, causal=False)
    blk = torch.arange(63) // 16
    same = blk[:, None] == blk[None, :]
    assert (a[~same] == 0).all()
    assert rel_err(a[same], (q @ k.T)[same]) < 1e-14


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "scaled"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_operator_matrix_times_v_is_mhla_reference(normalize, causal, per_head):
    n, h, d, c = 63, 2, 8, 16
    q, k, v = features(n, d, heads=h)
    g = torch.Generator().manual_seed(1)
    mixing = torch.rand(*((h,) * per_head), 4, 4, generator=g, dtype=torch.float64)
    want = mhla_reference(q, k, v, mixing, c, causal=causal, normalize=normalize)
    for head in range(h):
        a = mhla_matrix(q[0, :, head], k[0, :, head], mixing[head] if per_head else mixing, c,
                        causal=causal)
        op = operator_matrix(a, normalize=normalize, scale=None if normalize else d**-0.5)
        err = rel_err(op @ v[0, :, head], want[0, :, head])
        assert err < 1e-12, f"head {head}: relative error {err:.2e}"


def test_linear_rank_is_at_most_d_and_mhla_exceeds_it():
    """M blocks of independent random q, k with a full-rank Mc: rank M d > d."""
    n, d, c = 64, 4, 16
    q, k, _ = features(n, d)
    mixing = torch.eye(4, dtype=torch.float64) + 0.1 * torch.ones(4, 4, dtype=torch.float64)
    assert numerical_rank(linear_matrix(q, k, causal=False)) == d
    assert numerical_rank(mhla_matrix(q, k, mixing, c, causal=False)) == 4 * d
    assert numerical_rank(operator_matrix(mhla_matrix(q, k, mixing, c, causal=False),
                                          normalize=True)) == 4 * d


def test_the_causal_mask_lifts_linear_attentions_rank_bound():
    """What the module docstring warns: tril of a rank-1 positive product is full rank."""
    q, k, _ = features(32, 1)
    assert numerical_rank(linear_matrix(q, k, causal=True)) == 32


@pytest.mark.parametrize("n", [1, 7, 100])
def test_a_uniform_causal_row_has_entropy_log_t_plus_1(n):
    h, hmax, ratio = row_entropy(torch.ones(n, n).tril(), causal=True)
    want = sum(math.log(t + 1) for t in range(n)) / n
    assert abs(h - want) < 1e-12 and abs(hmax - want) < 1e-12 and abs(ratio - 1) < 1e-12


def test_one_hot_rows_have_zero_entropy_and_signs_do_not_matter():
    assert row_entropy(torch.eye(5), causal=True)[0] == 0
    a = torch.randn(9, 9, generator=torch.Generator().manual_seed(0)).tril()
    assert row_entropy(a) == row_entropy(-a.abs())


@pytest.mark.parametrize("n", [1, 5, 64])
def test_effective_rank_of_identity_is_its_size(n):
    assert abs(effective_rank(torch.eye(n)) - n) < 1e-9
    assert abs(effective_rank(torch.ones(n, n)) - 1) < 1e-6  # rank one


def test_softmax_matrix_is_causal_sdpa():
    q, k, v = (torch.randn(1, 1, 40, 8, generator=torch.Generator().manual_seed(i),
                           dtype=torch.float64) for i in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(softmax_matrix(q[0, 0], k[0, 0]) @ v[0, 0], want[0, 0]) < 1e-12


def test_bad_selections_name_the_value():
    assert select("all", 3, "layers") == [0, 1, 2]
    assert select("2,0", 3, "layers") == [0, 2]
    with pytest.raises(ValueError, match=r"layers='0,5'.*\[5\] not in \[0, 3\)"):
        select("0,5", 3, "layers")
    with pytest.raises(ValueError, match="heads='x'"):
        select("x", 4, "heads")
    with pytest.raises(ValueError, match="layers=',' names none"):
        select(",", 3, "layers")
    with pytest.raises(ValueError, match="M >= 4 blocks"):
        mhla_matrix(*list(features(63, 8))[:2], torch.ones(2, 2), 16)


def test_shard_windows_stay_inside_one_document(tmp_path):
    from mhla_dist.data import build_default_corpus

    info = build_default_corpus(tmp_path / "corpus", docs_per_shard=8)
    x = shard_windows(info.eval, 64, 3, vocab_size=257, one_document=True)
    assert x.shape == (3, 64) and not (x == 256).any()  # no EOS: one document each
    with pytest.raises(ValueError, match="no unpadded window of 100000 tokens"):
        shard_windows(info.eval, 100_000, 1, vocab_size=257, one_document=True)


def make_lm_run(run_dir: Path, overrides: list[str]) -> None:
    """An LM run directory as training leaves it (config.yaml, model.safetensors)."""
    from safetensors.torch import save_file

    from mhla_dist.config import config_to_yaml, load_config
    from mhla_dist.model.lm import MHLALanguageModel
    from mhla_dist.parallel import build_topology, destroy_topology

    cfg = load_config(None, TINY_RUN + overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    build_topology()
    try:
        torch.manual_seed(0)
        model = MHLALanguageModel(cfg.model)
        save_file({k: p.detach().contiguous() for k, p in model.named_parameters()},
                  str(run_dir / "model.safetensors"))
    finally:
        destroy_topology()


def test_cli_on_a_tiny_hybrid_run(tmp_path):
    run = tmp_path / "run"
    make_lm_run(run, ["model.num_layers=3", "model.softmax_layers=[1]", "model.normalize=true",
                      "model.per_head_mixing=true"])
    text = tmp_path / "text.txt"
    text.write_text("The for statement iterates over the items of a sequence. " * 8)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([sys.executable, "tools/attention_rank.py", str(run), "--text",
                           str(text), "--tokens", "64", "--windows", "2", "--out",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "attention_rank.json").read_text())
    assert (tmp_path / "out" / "attention_rank.png").stat().st_size > 0
    assert result["windows"] == 2 and result["tokens"] == 64 and result["num_blocks"] == 4
    kinds = {(r["layer"], r["head"], r["kind"]) for r in result["rows"]}
    assert kinds == {(i, h, kind) for i in (0, 2) for h in (0, 1) for kind in ("mhla", "linear")
                     } | {(1, h, "softmax") for h in (0, 1)}
    for r in result["rows"]:
        assert 0 < r["entropy_ratio"] <= 1 + 1e-9 and 1 <= r["effective_rank"] <= 64, r
    assert "mhla" in proc.stdout and "linear" in proc.stdout and "softmax" in proc.stdout
    # At the row-average init Mc[i, b] = 1 / (i + 1) every row of A is a multiple of linear
    # attention's: normalised, untrained MHLA *is* linear attention.
    metric = {(r["layer"], r["head"], r["kind"]): r["effective_rank"] for r in result["rows"]}
    for i, h in [(0, 0), (0, 1), (2, 0), (2, 1)]:
        assert abs(metric[i, h, "mhla"] - metric[i, h, "linear"]) < 1e-6
