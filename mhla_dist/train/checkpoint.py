"""Checkpoints: DeepSpeed's engine state plus what DeepSpeed does not know about.

    run_dir/checkpoints/
        step00000100/                  DeepSpeed's files (model, ZeRO optimizer shards)
            trainer_state/rank00000.pt step, data-loader state, RNG states (one per rank)
            config.yaml                the resolved config
        latest                         the tag of the newest *complete* checkpoint

Every rank writes into a staging folder that rank 0 renames into place after all finished
(a barrier), and only then is `latest` replaced atomically (write, then rename), so a
crash mid-save leaves the previous checkpoint in charge; a folder newer than `latest` is
ignored with a warning. The same `latest` file is what DeepSpeed's own tools
(`zero_to_fp32`) read.

`keep_last` counts every full checkpoint folder of the trainer's: the `stepXXXXXXXX`
folders and the `stepXXXXXXXX.replaced-K` ones (a step folder a resumed run reached
again, moved aside). After each save the folder `latest` names is kept first, then the
run's own older steps, newest first; then what a rollback left behind (folders of steps
after `latest`, from the branch abandoned when the run resumed from an earlier
checkpoint, and the replaced folders), newest first. Whatever does not fit is deleted,
and each deletion of an abandoned folder is logged. The checkpoint `latest` names is
never deleted; nothing but these folders is ever touched.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .integrity import CheckpointCorruptError, check_checkpoint, write_manifest

log = logging.getLogger("mhla_dist.train")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


TAG = re.compile(r"step\d{8}")
REPLACED = re.compile(r"(step\d{8})\.replaced-(\d+)")


def _tags(ckpt_dir: Path) -> list[str]:
    """The trainer's own checkpoint folders (`stepXXXXXXXX`); keep-last deletes only these."""
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


def _saved_step(path: Path) -> int:
    return torch.load(path / "trainer_state" / f"rank{0:05d}.pt", weights_only=False)["step"]


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from: `latest` (resume=auto), a given folder, or
    None (resume=none, or nothing complete yet).

    Every candidate is checked against its manifest (`integrity.py`):
    resume=PATH fails naming the bad file; resume=auto falls back from `latest` to the
    newest earlier checkpoint that verifies, with a warning naming what it skipped, and
    fails when none does (resume=none starts from scratch on purpose)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer_state").is_dir():
            raise FileNotFoundError(
                f"resume={resume!r} is not a complete checkpoint folder (no trainer_state/ "
                f"inside); give a folder like {ckpt_dir / tag_for(100)} or resume=auto")
        check_checkpoint(path)
        own = ckpt_dir / LATEST
        newest = ckpt_dir / own.read_text().strip() if own.is_file() else None
        if newest is not None and newest.is_dir():
            given, latest_step = _saved_step(path), _saved_step(newest)
            if latest_step > given:
                log.warning("resume=%s (step %d) is older than this run's latest checkpoint "
                            "%s (step %d); resume=auto continues from there. Rolling back: "
                            "once this run saves, the checkpoints after step %d count as "
                            "abandoned and are deleted first under checkpoint.keep_last",
                            path, given, newest, latest_step, given)
        return path
    latest = ckpt_dir / LATEST
    tags = _tags(ckpt_dir) if ckpt_dir.is_dir() else []
    if not latest.is_file():
        if tags:
            log.warning("ignoring checkpoint folders %s in %s: no completed 'latest' entry "
                        "(a save that did not finish); starting from scratch", tags, ckpt_dir)
        return None
    tag = latest.read_text().strip()
    newer = [t for t in tags if t > tag]
    if newer:
        log.warning("ignoring checkpoint folders %s newer than latest=%s (incomplete saves)",
                    newer, tag)
    skipped = []
    for candidate in [tag, *sorted((t for t in tags if t < tag), reverse=True)]:
        path = ckpt_dir / candidate
        if not path.is_dir():
            skipped.append(f"{candidate} (named by 'latest', does not exist)")
            continue
        try:
            check_checkpoint(path)
        except CheckpointCorruptError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            log.warning("resuming from %s, the newest checkpoint that verifies; skipped: %s",
                        path, "; ".join(skipped))
        return path
    raise CheckpointCorruptError(f"no checkpoint in {ckpt_dir} can be resumed: "
                                 + "; ".join(skipped) + " (resume=none starts from scratch)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _aside(path: Path) -> Path:
    """A free name beside `path` for the folder it replaces."""
    k = 1
    while path.with_name(f"{path.name}.replaced-{k}").exists():
        k += 1
    return path.with_name(f"{path.name}.replaced-{k}")


class CheckpointSaveError(RuntimeError):
    pass


def save_checkpoint(engine, ckpt_dir: Path, step: int, trainer_state: dict, keep_last: int,
                    config_yaml: str, param_group_names: list[list[str]] | None = None,
                    *, device: torch.device | None = None, fault=None) -> Path:
    """Save on every rank; returns the checkpoint folder. `param_group_names` (the names of
    the optimizer's parameter groups, in order) go into DeepSpeed's model states, where a
    ZeRO-0 mixed-precision checkpoint's fp32 masters are stored by group position only.

    Every rank writes into `.stepXXXXXXXX.saving`; after a barrier rank 0 writes the
    manifest (`integrity.py`), renames the folder to `stepXXXXXXXX` and only then points
    `latest` at it. A folder of that name already there (a run resumed from an earlier
    step, maybe at another layout, reaching it again) is renamed
    `stepXXXXXXXX.replaced-K`, never written into: old and new files would mix.

    A rank whose writes raise (a full disk) makes the save fail on every rank: the staging
    folder is removed, `latest` stays where it was, and `CheckpointSaveError` names the
    failed ranks (the trainer stops with it). `fault` (`faults.FaultInjector`) is the
    tests' way to make a rank fail here.
    """
    tag = tag_for(step)
    staging = ckpt_dir / f".{tag}.saving"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=staging.name,
                           client_state={"step": step, "iteration": step,
                                         "param_group_names": param_group_names},
                           save_latest=False)
    error = None
    try:
        (staging / "trainer_state").mkdir(parents=True, exist_ok=True)
        if fault is not None:
            fault.at_save(step)
        torch.save(trainer_state, staging / "trainer_state" / f"rank{rank:05d}.pt")
    except OSError as exc:
        error = exc
    failed = torch.zeros(dist.get_world_size(), device=device)
    failed[rank] = error is not None
    dist.all_reduce(failed)
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        latest = ckpt_dir / LATEST
        where = latest.read_text().strip() if latest.is_file() else "nothing yet"
        raise CheckpointSaveError(
            f"saving the step-{step} checkpoint failed on rank(s) {ranks}"
            + (f": {error}" if error is not None else "")
            + f"; nothing was kept of it and 'latest' still names {where}") from error
    path = ckpt_dir / tag
    if rank == 0:
        (staging / "config.yaml").write_text(config_yaml)
        write_manifest(staging)
        if path.exists():
            aside = _aside(path)
            os.replace(path, aside)
            log.warning("%s already existed (from before a resume from an earlier step?): "
                        "moved to %s", path, aside.name)
        os.replace(staging, path)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        prune_checkpoints(ckpt_dir, tag, keep_last)
    dist.barrier()
    return path


def _step_and_replacement(name: str) -> tuple[str, float]:
    """Age order of checkpoint folders: by step, and a step's `.replaced-K` folders (older
    versions of it, K counting up) before the folder itself."""
    m = REPLACED.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else (name, float("inf"))


def prune_checkpoints(ckpt_dir: Path, latest: str, keep_last: int) -> list[str]:
    """Delete all but `keep_last` checkpoint folders, `latest` first (see the module
    docstring for the order); returns the names deleted."""
    own, left = [], []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and TAG.fullmatch(p.name):
            (own if p.name <= latest else left).append(p.name)
        elif p.is_dir() and REPLACED.fullmatch(p.name):
            left.append(p.name)
    order = sorted(own, reverse=True) + sorted(left, key=_step_and_replacement, reverse=True)
    if order[:1] != [latest]:
        raise RuntimeError(f"{ckpt_dir / latest} (latest) is missing after its save")
    deleted = order[max(keep_last, 1):]
    for name in deleted:
        if name > latest or not TAG.fullmatch(name):
            log.warning("deleting %s: left behind by a resume from an earlier checkpoint "
                        "(a step after latest=%s, or a folder replaced since); "
                        "checkpoint.keep_last=%d", name, latest, keep_last)
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return deleted


def load_trainer_state(path: Path) -> dict:
    """This rank's trainer state from the checkpoint folder `path`."""
    mine = path / "trainer_state" / f"rank{dist.get_rank():05d}.pt"
    if not mine.is_file():
        # A new layout: take rank 0's state (the data loader then continues from the
        # same global sample count).
        log.warning("%s missing (the layout changed?); using rank 0's trainer state", mine)
        mine = path / "trainer_state" / f"rank{0:05d}.pt"
    return torch.load(mine, weights_only=False)
