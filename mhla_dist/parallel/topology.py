"""The parallel layout: one object answers every question about ranks, sizes and groups.

Ranks form a `DP x CP x TP` grid (DESIGN §2) built by megatron-core's `parallel_state`,
TP varying fastest, then CP, then DP (megatron's order "tp-cp-ep-dp-pp"). The process
group itself comes from the launcher's environment: `torchrun` and the `deepspeed`
launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a process
started alone becomes a world of one.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A parallel layout that does not fit the world, the heads, the tokens or the blocks."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 30) -> None:
    """Initialise `torch.distributed` from the launcher's environment (idempotent)."""
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if "WORLD_SIZE" not in os.environ:
        # A single process: a world of one, so the rest of the stack needs no special case.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(backend, timeout=timeout)
        return
    # torchrun's agent keeps one store across restarts and gloo finds its peers through
    # it: under the same keys a restarted rank can read a dead peer's address and fail
    # with "connection refused". Each restart gets keys of its own.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"mhla_restart_{restart}", store),
                            rank=rank, world_size=world, timeout=timeout)


def check_layout(
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    *,
    num_heads: int | None = None,
    seq_len: int | None = None,
    block_size: int | None = None,
) -> int:
    """Validate the degrees against the world and the model; returns the DP degree.

    Raises one `LayoutError` that lists every violated condition with its numbers.
    """
    problems = []
    for name, value in (("tp", tp), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name}={value!r} must be a positive integer")
    if world_size % (tp * cp):
        problems.append(
            f"tp={tp} x cp={cp} = {tp * cp} does not divide the world size {world_size} "
            "(data parallelism is what the world size leaves: world = dp x cp x tp)"
        )
    if num_heads is not None and num_heads % tp:
        problems.append(f"tp={tp} does not divide the {num_heads} attention heads")
    if seq_len is not None:
        if seq_len % cp:
            problems.append(f"cp={cp} does not divide the sequence length {seq_len}")
        elif block_size is not None and (seq_len // cp) % block_size:
            problems.append(
                f"block_size={block_size} does not divide the {seq_len // cp} tokens each "
                f"of the {cp} context-parallel ranks holds (sequence length {seq_len})"
            )
    if problems:
        raise LayoutError("invalid parallel layout: " + "; ".join(problems))
    return world_size // (tp * cp)


@dataclass(frozen=True)
class Topology:
    """Sizes, this rank's coordinates and the process groups of the `DP x CP x TP` grid."""

    world_size: int
    rank: int
    tp: int
    cp: int
    dp: int
    tp_rank: int
    cp_rank: int
    dp_rank: int
    dp_cp_rank: int
    backend: str
    device: torch.device
    tp_group: object
    cp_group: object
    dp_group: object
    dp_cp_group: object

    @property
    def dp_cp_size(self) -> int:
        """The ranks that hold replicas of every parameter (ZeRO's data-parallel group)."""
        return self.dp * self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp} "
                f"cp {self.cp_rank}/{self.cp} tp {self.tp_rank}/{self.tp} ({self.backend})")


def build_topology(
    tp: int = 1,
    cp: int = 1,
    *,
    num_heads: int | None = None,
    seq_len: int | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> Topology:
    """Initialise torch.distributed if needed and megatron-core's groups for `tp`, `cp`.
    `timeout_s` bounds every collective of the groups it creates (default 30 minutes)."""
    from megatron.core import parallel_state as ps

    minutes = 30 if not timeout_s else timeout_s / 60
    init_distributed(backend, timeout_minutes=minutes)
    world = dist.get_world_size()
    dp = check_layout(world, tp, cp, num_heads=num_heads, seq_len=seq_len,
                      block_size=block_size)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()) \
                != (tp, cp):
            raise LayoutError(
                f"megatron-core's groups already exist with tp="
                f"{ps.get_tensor_model_parallel_world_size()}, cp="
                f"{ps.get_context_parallel_world_size()}; call destroy_topology() first"
            )
    else:
        # gloo groups are the default groups on CPU already; megatron's extra gloo copies
        # would double the group creation for nothing.
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, context_parallel_size=cp,
            create_gloo_process_groups=False, distributed_timeout_minutes=minutes,
        )
    backend_name = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend_name == "nccl"
              else torch.device("cpu"))
    topo = Topology(
        world_size=world, rank=dist.get_rank(), tp=tp, cp=cp, dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        backend=backend_name, device=device,
        tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )
    log.debug("%s", topo.describe())
    return topo


def destroy_topology() -> None:
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
