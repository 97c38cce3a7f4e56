"""Fixtures of the model tests."""

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def solo():
    """A one-rank process group (the TP and CP group of a single-process model)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("needs a single-process world")
    yield dist.new_group([0])
    if created:
        dist.destroy_process_group()
