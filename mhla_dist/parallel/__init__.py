"""Parallelism for MHLA: the DP x CP x TP layout, collectives with adjoints, cp_mhla."""

from .collectives import (
    comm_stats,
    copy_to_group,
    counting_bytes,
    gather_from_group,
    reduce_scatter_to_group,
    start_gather,
)
from .cp_attention import check_cp_shard, cp_mhla
from .mpu import DeepSpeedMPU, init_deepspeed_comm
from .topology import (
    LayoutError,
    Topology,
    build_topology,
    check_layout,
    destroy_topology,
    init_distributed,
)

__all__ = [
    "DeepSpeedMPU",
    "LayoutError",
    "Topology",
    "build_topology",
    "check_cp_shard",
    "check_layout",
    "comm_stats",
    "copy_to_group",
    "counting_bytes",
    "cp_mhla",
    "destroy_topology",
    "gather_from_group",
    "init_deepspeed_comm",
    "init_distributed",
    "reduce_scatter_to_group",
    "start_gather",
]
