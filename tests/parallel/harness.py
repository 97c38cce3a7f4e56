"""Spawn gloo process groups inside a test and collect what each rank returns."""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mhla_dist.parallel.topology import free_port


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from mhla_dist.parallel.topology import destroy_topology

    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        destroy_topology()


def run_ranks(fn, world_size: int, *args) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; returns the
    list of their results (torch.save-able). `fn` must be importable (module level)."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args),
                     nprocs=world_size, join=True)
        except Exception as exc:
            errors = sorted(Path(out_dir).glob("rank*.err"))
            detail = "\n".join(p.read_text() for p in errors)
            raise AssertionError(f"a rank failed:\n{detail or exc}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world_size)]
