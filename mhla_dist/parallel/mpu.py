"""The `mpu` object DeepSpeed takes, over a `Topology`.

DeepSpeed reduces gradients (and ZeRO partitions optimizer state) over what the mpu calls
the data-parallel group. Context-parallel ranks hold replicas of every parameter, so that
group is DP x CP (megatron-core's `get_data_parallel_group(with_context_parallel=True)`),
never DP alone: otherwise CP replicas drift apart. "Model parallel" is TP (no pipeline).

No `get_sequence_parallel_*` methods on purpose: DeepSpeed would take them for its own
Ulysses sequence parallelism and change how it reduces gradients.

`init_deepspeed_comm` is `deepspeed.init_distributed` for the trainer.
"""

from __future__ import annotations

import torch.distributed as dist

from .topology import Topology


class DeepSpeedMPU:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    # data parallel = DP x CP
    def get_data_parallel_group(self):
        return self.topology.dp_cp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp_cp_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_cp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.topology.dp_cp_group)

    # tensor (= model) parallel
    def get_tensor_model_parallel_group(self):
        return self.topology.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topology.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.topology.tp_group)[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()


def init_deepspeed_comm(backend: str) -> None:
    """`deepspeed.init_distributed(dist_backend=backend)`, without DeepSpeed's CPU
    shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed JIT-compiles that C++ op (`deepspeed_shm_comm`) on
    every first start, under a lock file in the torch extensions folder. A build that is
    killed leaves the lock behind, and every later start then waits for it forever. The
    op only serves `inference_all_reduce`, which training never calls, so it is marked
    incompatible here and DeepSpeed uses the process group's all-reduce, as it does
    where the op cannot be built. GPU accelerators never build it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        builder = accelerator.create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    deepspeed.init_distributed(dist_backend=backend)
