"""Checkpoint integrity: a manifest of every file, written before `latest` moves, checked
before a checkpoint is loaded.

    stepXXXXXXXX/manifest.json   {"version": 1, "files": {"rel/path": {"size", "sha256"}}}

A file that is missing, of another size or another hash (a truncated shard, a flipped
byte) makes the checkpoint fail verification, naming the file. A folder without a
manifest was saved before manifests existed: it is loaded unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("mhla_dist.train")
MANIFEST = "manifest.json"
VERSION = 1


class CheckpointCorruptError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> Path:
    """Hash every file under `folder` (the manifest itself excluded) into its manifest."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    out = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": VERSION, "files": files}, indent=1))
    tmp.replace(out)
    return out


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with `folder` against its manifest (empty: it verifies). Raises
    FileNotFoundError when there is no manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return [f"{manifest} is unreadable ({exc})"]
    problems = []
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, the manifest says "
                            f"{want['size']} (truncated or replaced)")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{p} does not match its sha256 in the manifest (altered)")
    return problems


def check_checkpoint(folder: Path) -> None:
    """Raise `CheckpointCorruptError` naming every bad file of `folder`; warn when it has
    no manifest."""
    try:
        problems = verify_checkpoint(folder)
    except FileNotFoundError:
        log.warning("%s has no %s (saved before manifests were written): loading it "
                    "unverified", folder, MANIFEST)
        return
    if problems:
        raise CheckpointCorruptError(f"checkpoint {folder} fails verification: "
                                     + "; ".join(problems))
