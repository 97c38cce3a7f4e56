"""Text files or folders -> LM token shards (webdataset tars of uint16/uint32 `.npy`).

    python tools/prepare_text.py --input books/ notes.txt --output data/text
    python tools/prepare_text.py --input corpus.jsonl --output data/text --shard-size 5000
    python tools/prepare_text.py --input docs/ --output data/t --tokenizer tokenizer.json

Inputs: `.txt`, `.md`, `.rst` files (one document each, or one per blank-line paragraph
with `--split paragraph`) and `.jsonl` files (one document per line, its "text" field);
folders are searched recursively, in sorted order. Output: `<prefix>-000000.tar, ...`
and `<prefix>.json` (the loader pattern, per-shard counts, tokenizer, vocab size). The
byte tokenizer is built in; a `tokenizer.json` needs the `tokenizers` package.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.progress import Progress

from mhla_dist.data import ShardSink, load_tokenizer, token_sample

log = logging.getLogger("prepare_text")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def input_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--input {p}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}, .jsonl) "
                                f"in {paths}")
    return files


def documents(path: Path, split: str) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        log.warning("%s:%d: skipped (%s)", path, n, exc)
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if split == "paragraph":
        yield from (p.strip() for p in text.split("\n\n") if p.strip())
    elif text.strip():
        yield text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--input", nargs="+", required=True, help="text/jsonl files or folders")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json")
    ap.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
    ap.add_argument("--max-shard-mb", type=float, default=256.0, help="bytes cap per shard")
    ap.add_argument("--split", choices=["file", "paragraph"], default="file",
                    help="one document per file (default) or per blank-line paragraph")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tok = load_tokenizer(args.tokenizer)
    files = input_files(args.input)
    meta = {"kind": "lm", "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id}
    with ShardSink(args.output, args.prefix, maxcount=args.shard_size,
                   maxsize=args.max_shard_mb * 1e6, meta=meta) as sink, \
            Progress(disable=args.quiet) as progress:
        task = progress.add_task("tokenising", total=len(files))
        for path in files:
            for text in documents(path, args.split):
                tokens = tok.encode(text)
                if len(tokens):
                    n = sink.summary.samples
                    sink.write(token_sample(n, tokens, doc_id=n, source=str(path)),
                               tokens=len(tokens))
            progress.advance(task)
    s = sink.summary
    if not s.samples:
        log.error("no non-empty document in %d file(s)", len(files))
        return 1
    print(f"documents: {s.samples}  tokens: {s.tokens}  shards: {len(s.shards)}  "
          f"(tokenizer {tok.name}, vocab {tok.vocab_size})\nloader pattern: {s.pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
