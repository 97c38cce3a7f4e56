"""Shard lists and tar reading on webdataset's pieces.

URLs are written as webdataset users write them: local paths, brace-expanded lists
(`data/shard-{000000..000099}.tar`), `pipe:` commands (`pipe:aws s3 cp s3://b/x.tar -`),
several specs joined by `::` or given as a list. A local directory stands for the sorted
`*.tar` files in it. Streams are opened with `webdataset.gopen` and read with `tarfile`
in streaming mode, so a shard is never held whole.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mhla_dist.data.stats import BadDataEvent, report_bad_shard

log = logging.getLogger(__name__)

RawSample = dict[str, bytes]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand shard specs into a flat list of URLs (order kept, duplicates refused)."""
    specs = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            if not part:
                continue
            if "://" not in part and not part.startswith("pipe:") and Path(part).is_dir():
                found = sorted(str(p) for p in Path(part).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"directory {part} holds no *.tar shards")
                out += found
            else:
                out += list(braceexpand.braceexpand(part))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    dupes = sorted({u for u in out if out.count(u) > 1})
    if dupes:
        raise ValueError(f"shards listed twice would be read twice per epoch: {dupes[:5]}")
    return out


def _close(stream: object) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def read_shard(url: str, events: list[BadDataEvent]) -> Iterator[tuple[str, RawSample]]:
    """Yield `(key, {extension: bytes})` samples of one tar shard, in file order.

    Files are grouped into samples by webdataset's rule (the key is the path up to the
    first dot of the file name). An unreadable or truncated shard is reported once in
    `events`; the samples before the damage are kept, the incomplete one is dropped.
    Only whole samples are yielded: the last one of a shard once its end is read.
    """
    stream = None
    key: str | None = None
    files: RawSample = {}
    try:
        stream = gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or Path(info.name).name.startswith("__"):
                    continue
                data = tar.extractfile(info).read()
                tar.members = []  # streaming: do not keep every header in memory
                if prefix != key:
                    if key is not None and files:
                        yield key, files
                    key, files = prefix, {}
                files[suffix.lower()] = data
            # tarfile ends quietly on a header cut short; a complete archive ends with a
            # whole zero block, so a short last read means the shard was truncated
            end = tar.fileobj.tell()
            if end - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"truncated at byte {end} (no end-of-archive block)")
        if key is not None and files:
            yield key, files
        key = None
        _close(stream)
        stream = None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        report_bad_shard(events, url, exc)
    finally:
        if stream is not None:
            try:
                _close(stream)
            except Exception as exc:  # a failing pipe: command reports its status here
                log.debug("closing %s failed: %s", url, exc)
