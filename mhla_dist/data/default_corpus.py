"""The embedded default text corpus: CPython's bundled documentation, byte-tokenised.

`pydoc_data.topics` ships with every CPython (the text `help("for")` shows): about 80
topics, ~0.5 MB of English prose and code. Each topic is cut at paragraph boundaries into
documents of at most ~`max_doc_chars`; every `eval_every`-th document (in a fixed order)
is held out for evaluation. No download, deterministic, well under a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mhla_dist.data.tokenizer import ByteTokenizer
from mhla_dist.data.writing import ShardSink, token_sample

log = logging.getLogger(__name__)

CORPUS_VERSION = 1


@dataclass(frozen=True)
class CorpusInfo:
    train: str  # brace pattern of the training shards
    eval: str  # brace pattern of the held-out shards
    train_documents: int
    eval_documents: int
    train_tokens: int
    eval_tokens: int
    vocab_size: int
    eos_id: int


def default_documents(max_doc_chars: int = 4000) -> list[str]:
    """The corpus text as documents, in a fixed order."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        current = ""
        for para in topics[name].split("\n\n"):
            if current and len(current) + len(para) > max_doc_chars:
                docs.append(current.strip())
                current = ""
            current += para + "\n\n"
        if current.strip():
            docs.append(current.strip())
    return docs


def build_default_corpus(output: str | Path, *, eval_every: int = 10, docs_per_shard: int = 32,
                         max_doc_chars: int = 4000) -> CorpusInfo:
    """Write train/ and eval/ token shards under `output` (reused when already built with
    the same settings) and return their patterns and sizes."""
    out = Path(output)
    settings = {"version": CORPUS_VERSION, "eval_every": eval_every,
                "docs_per_shard": docs_per_shard, "max_doc_chars": max_doc_chars}
    info_path = out / "corpus.json"
    if info_path.is_file():
        stored = json.loads(info_path.read_text())
        if stored.get("settings") == settings:
            return CorpusInfo(**stored["info"])
    tok = ByteTokenizer()
    meta = {"kind": "lm", "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "source": "pydoc_data.topics"}
    with ShardSink(out / "train", "train", maxcount=docs_per_shard, meta=meta) as train, \
            ShardSink(out / "eval", "eval", maxcount=docs_per_shard, meta=meta) as held_out:
        for i, text in enumerate(default_documents(max_doc_chars)):
            sink = held_out if eval_every > 0 and i % eval_every == eval_every - 1 else train
            tokens = tok.encode(text)
            sink.write(token_sample(i, tokens, doc_id=i), tokens=len(tokens))
    info = CorpusInfo(train.summary.pattern, held_out.summary.pattern,
                      train.summary.samples, held_out.summary.samples,
                      train.summary.tokens, held_out.summary.tokens, tok.vocab_size, tok.eos_id)
    info_path.write_text(json.dumps({"settings": settings, "info": info.__dict__}, indent=1))
    log.info("default corpus: %d train / %d eval documents, %d / %d tokens, in %s",
             info.train_documents, info.eval_documents, info.train_tokens, info.eval_tokens, out)
    return info
