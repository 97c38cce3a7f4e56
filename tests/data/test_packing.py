"""LM packing into seq_len + 1 windows, the shift, cp_slice; tokenizer; default corpus."""

import numpy as np
import pytest
import torch

from mhla_dist.data import (
    EOS_ID,
    IGNORE_INDEX,
    ByteTokenizer,
    TokenWindows,
    build_default_corpus,
    cp_slice,
    lm_loader,
    load_tokenizer,
    shift_tokens,
)
from mhla_dist.data.samples import Document


def _docs(*lengths):
    start = 0
    for i, n in enumerate(lengths):
        yield Document(np.arange(start, start + n, dtype=np.int64), doc_id=i)
        start += n


def test_windows_overlap_by_one_and_pad_the_end():
    src = TokenWindows(seq_len=4, batch_size=2, eos_id=None, pad_id=0)
    wins = list(src.windows(_docs(3, 6)))  # tokens 0..8
    assert [w[0].tolist() for w in wins] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert [w[1].tolist() for w in wins] == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    wins = list(src.windows(_docs(3, 7)))  # tokens 0..9: the last window is padded
    assert wins[-1][0].tolist() == [8, 9, 0, 0, 0] and wins[-1][1].tolist() == [1, 1, -1, -1, -1]


def test_eos_belongs_to_the_document_it_ends():
    src = TokenWindows(seq_len=8, batch_size=1, eos_id=EOS_ID)
    (win,) = list(src.windows(_docs(2, 3)))
    assert win[0].tolist()[:7] == [0, 1, EOS_ID, 2, 3, 4, EOS_ID]
    assert win[1].tolist() == [0, 0, 0, 1, 1, 1, 1, -1, -1]


def test_shift_masks_padded_targets():
    batch = {"tokens": torch.tensor([[5, 6, 7, 0, 0]]),
             "doc_ids": torch.tensor([[1, 1, 2, -1, -1]])}
    out = shift_tokens(batch, document_masking=False)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0]]
    assert out["labels"].tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["doc_ids"].tolist() == [[1, 1, 2, -1]]
    # document masking (the default) also ignores target 7 of input 6: it crosses documents
    assert shift_tokens(batch)["labels"].tolist() == [[6] + [IGNORE_INDEX] * 3]


def test_cp_slice_errors_name_the_numbers():
    batch = {"tokens": torch.zeros(2, 11, dtype=torch.long),
             "doc_ids": torch.zeros(2, 11, dtype=torch.long)}
    with pytest.raises(ValueError, match="sequence length 10 does not split over cp_size=4"):
        cp_slice(batch, 0, 4)
    with pytest.raises(ValueError, match="cp_rank=2"):
        cp_slice(batch, 2, 2)
    assert cp_slice(batch, 1, 2)["input_ids"].shape == (2, 5)


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "Linear attention, naïvely — 线性"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256 and tok.vocab_size == 257
    assert tok.decode(np.append(ids, EOS_ID)) == text
    assert isinstance(tok, ByteTokenizer)


def write_word_tokenizer(path):
    """A small word-level tokenizer.json built here (no hub): [UNK], </s> and some words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "</s>", "the", "for", "statement", "loops", "over", "items", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_tokenizer_json_round_trip_and_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    write_word_tokenizer(path)
    tok = load_tokenizer(str(path))
    assert (tok.vocab_size, tok.eos_id) == (9, 1)
    ids = tok.encode("the for statement loops over items")
    assert ids.tolist() == [2, 3, 4, 5, 6, 7] and ids.dtype.name == "uint16"
    assert tok.decode(ids) == "the for statement loops over items"
    assert tok.encode("unknown words").tolist() == [0, 0]


def test_tokenizer_json_errors(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    write_word_tokenizer(path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tokenizers" else real(name, *a))
    with pytest.raises(ImportError, match="needs the `tokenizers` package"):
        load_tokenizer(str(path))
    with pytest.raises(FileNotFoundError, match="neither 'byte'"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_default_corpus_is_real_text_with_a_disjoint_eval_split(tmp_path):
    info = build_default_corpus(tmp_path / "c")
    assert info.train_documents > 100 and info.eval_documents > 10
    assert info.train_tokens > 300_000 and info.vocab_size == 257
    assert build_default_corpus(tmp_path / "c") == info  # reused, not rebuilt
    ids = {}
    for split in ("train", "eval"):
        loader = lm_loader(getattr(info, split), seq_len=512, batch_size=8, num_epochs=1,
                           vocab_size=info.vocab_size)
        ids[split] = set()
        for batch in loader:
            ids[split] |= set(batch["doc_ids"].unique().tolist()) - {-1}
    assert not ids["train"] & ids["eval"]
    assert len(ids["train"]) == info.train_documents and len(ids["eval"]) == info.eval_documents
    text = ByteTokenizer().decode(batch["tokens"][0])
    assert sum(w in text for w in (" the ", " is ", " of ")) >= 2
