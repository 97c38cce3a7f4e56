"""Document masking of packed LM batches: `cu_seqlens` of the inputs and the targets that
cross documents (`shift_tokens`, `cp_slice`), on real loader batches and by hand."""

import numpy as np
import pytest
import torch

from mhla_dist.data import IGNORE_INDEX, cp_slice, document_offsets, lm_loader, shift_tokens
from mhla_kernels.packing import check_cu_seqlens
from tests.data.fixtures import write_docs

L = 16


def _offsets_by_loop(doc_ids: torch.Tensor) -> list[int]:
    """The offsets of `doc_ids [B, L]`, one token at a time."""
    rows = doc_ids.tolist()
    n = len(rows[0])
    cu = []
    for b, row in enumerate(rows):
        for t, d in enumerate(row):
            if t == 0 or d != row[t - 1]:
                cu.append(b * n + t)
    return [*cu, len(rows) * n]


def _labels_by_loop(batch: dict) -> list[list[int]]:
    """Targets, ignored where padding or of another document than the input."""
    out = []
    for toks, ids in zip(batch["tokens"].tolist(), batch["doc_ids"].tolist(), strict=True):
        out.append([IGNORE_INDEX if ids[t + 1] < 0 or ids[t + 1] != ids[t] else toks[t + 1]
                    for t in range(len(toks) - 1)])
    return out


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """One epoch (its last window padded) of random documents: length 1, short, and longer
    than a window; no EOS, so length-1 documents stay one token."""
    rng = np.random.default_rng(7)
    lengths = [1, 1, 40, 1, 3] + [int(n) for n in rng.choice([1, 2, 5, 11, 23, 37], 55)]
    docs = [rng.integers(0, 250, n).astype(np.uint16) for n in lengths]
    pattern = write_docs(tmp_path_factory.mktemp("docs"), docs, per_shard=7)
    loader = lm_loader(pattern, seq_len=L, batch_size=3, num_epochs=1, eos_id=None, seed=3)
    return list(loader)


def test_offsets_equal_a_loop_over_doc_ids(batches):
    steps, spans = set(), 0
    for batch in batches:
        out = shift_tokens(batch)
        cu = out["cu_seqlens"]
        B = batch["tokens"].shape[0]
        assert cu.dtype == torch.int64 and cu.device.type == "cpu" and cu.dim() == 1
        assert cu.tolist() == _offsets_by_loop(out["doc_ids"])
        assert torch.equal(check_cu_seqlens(cu, B * L, L), cu)
        assert set(range(0, B * L + 1, L)) <= set(cu.tolist())
        steps |= set((cu[1:] - cu[:-1]).tolist())
        spans += int((batch["doc_ids"][:, -1] == batch["doc_ids"][:, -2]).sum())
    assert 1 in steps and L in steps and spans > 0  # the awkward cases were there


def test_cross_document_targets_are_ignored_exactly_at_the_boundaries(batches):
    for batch in batches:
        out = shift_tokens(batch)
        labels, cu = out["labels"], set(out["cu_seqlens"].tolist())
        assert labels.tolist() == _labels_by_loop(batch)
        ids = batch["doc_ids"]
        for b in range(labels.shape[0]):
            for t in range(L):
                if ids[b, t + 1] < 0:  # a padding target: ignored in both modes
                    assert labels[b, t] == IGNORE_INDEX
                    continue
                # the next token starts a document: a boundary in cu (within the row), or
                # the window's last target reading the next window's first document
                crosses = b * L + t + 1 in cu if t < L - 1 else bool(ids[b, L] != ids[b, L - 1])
                assert (labels[b, t] == IGNORE_INDEX) == crosses, (b, t)


def test_without_document_masking_the_batch_is_as_before(batches):
    for batch in batches:
        out = shift_tokens(batch, document_masking=False)
        assert sorted(out) == ["doc_ids", "input_ids", "labels"]
        expected = batch["tokens"][:, 1:].clone()
        expected[batch["doc_ids"][:, 1:] < 0] = IGNORE_INDEX
        assert torch.equal(out["labels"], expected)
        assert torch.equal(out["input_ids"], batch["tokens"][:, :-1])
        assert torch.equal(out["doc_ids"], batch["doc_ids"][:, :-1])
        local = cp_slice(batch, 1, 2, document_masking=False)
        assert "cu_seqlens" not in local
        assert torch.equal(local["labels"], expected[:, L // 2:])
    masked = sum(int((shift_tokens(b)["labels"] != IGNORE_INDEX).sum()) for b in batches)
    kept = sum(int((shift_tokens(b, document_masking=False)["labels"] != IGNORE_INDEX).sum())
               for b in batches)
    assert masked < kept


@pytest.mark.parametrize("cp_size", [2, 4], ids=["cp2", "cp4"])
def test_cp_slice_keeps_the_offsets_global(batches, cp_size):
    for batch in batches[:3] + batches[-1:]:
        full = shift_tokens(batch)
        parts = [cp_slice(batch, r, cp_size) for r in range(cp_size)]
        for p in parts:
            assert torch.equal(p["cu_seqlens"], full["cu_seqlens"])
        for key in ("input_ids", "labels", "doc_ids"):
            assert all(p[key].shape[1] == L // cp_size for p in parts)
            assert torch.equal(torch.cat([p[key] for p in parts], dim=1), full[key])
        shifted = cp_slice(full, cp_size - 1, cp_size)  # an already shifted batch too
        assert torch.equal(shifted["cu_seqlens"], full["cu_seqlens"])


def test_padded_last_window(batches):
    last = batches[-1]
    pad = int((last["doc_ids"][-1] < 0).sum())
    assert 1 < pad < L  # the epoch ended inside the last window, padding among the inputs
    B = last["tokens"].shape[0]
    out = shift_tokens(last)
    # the padding run among the inputs is a document of its own, the last one
    assert out["cu_seqlens"][-2:].tolist() == [B * L - (pad - 1), B * L]
    assert (out["labels"][-1, L - pad:] == IGNORE_INDEX).all()
    assert torch.equal(check_cu_seqlens(out["cu_seqlens"], B * L, L), out["cu_seqlens"])


def test_by_hand():
    batch = {"tokens": torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]]),
             "doc_ids": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 2, 2]])}
    out = shift_tokens(batch)
    assert out["cu_seqlens"].tolist() == [0, 2, 4, 7, 8]  # doc 1 restarts at the row start
    assert out["labels"].tolist() == [[6, IGNORE_INDEX, 8, 9], [10, 11, IGNORE_INDEX, 13]]
    padded = {"tokens": torch.tensor([[5, 6, 7, 0, 0]]),
              "doc_ids": torch.tensor([[1, 1, 2, -1, -1]])}
    out = shift_tokens(padded)
    assert out["cu_seqlens"].tolist() == [0, 2, 3, 4]
    assert out["labels"].tolist() == [[6] + [IGNORE_INDEX] * 3]
    assert document_offsets(torch.full((3, 4), 9)).tolist() == [0, 4, 8, 12]
