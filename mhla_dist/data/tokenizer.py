"""Tokenizers for the text tools: byte level (built in) or a HF `tokenizer.json`.

Byte level: ids 0..255 are the UTF-8 bytes, 256 is EOS (the document separator the LM
packer appends); `vocab_size = 257`. A model may round its embedding table up (e.g. 320)
for efficient matmuls; ids above 256 are then never produced.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

EOS_ID = 256
BYTE_VOCAB_SIZE = 257


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; `encode` returns uint16."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        data = bytes(int(i) for i in np.asarray(ids).ravel() if int(i) < 256)
        return data.decode("utf-8", errors="replace")


class JSONTokenizer:
    """A Hugging Face `tokenizer.json`, through the optional `tokenizers` package."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        if importlib.util.find_spec("tokenizers") is None:
            raise ImportError(
                f"--tokenizer {path}: reading tokenizer.json needs the `tokenizers` package, "
                "which is not installed (pip install tokenizers), or use --tokenizer byte")
        from tokenizers import Tokenizer as HFTokenizer

        self.name = str(path)
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = None
        for cand in ([eos_token] if eos_token else ["<|endoftext|>", "</s>", "<eos>", "[SEP]"]):
            if cand is not None and self._tok.token_to_id(cand) is not None:
                self.eos_id = self._tok.token_to_id(cand)
                break

    def encode(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=dtype)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()])


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """`"byte"` or a path to a `tokenizer.json`."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"tokenizer {spec!r} is neither 'byte' nor a tokenizer.json file")
    return JSONTokenizer(spec)
