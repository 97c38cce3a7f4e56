"""A bf16 run's `model.safetensors` holds the fp32 master weights (ZeRO's fp32 partitions,
or the mixed-precision optimizer's at ZeRO-0), equal to what DeepSpeed's own
`zero_to_fp32` reads from the run's last checkpoint; `init.weights=` from that file starts
a bf16 run with exactly those masters (before the fix both were the bf16-rounded copies).
"""

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.harness import run_ranks
from tests.train.runs import TINY_RUN, corpus


def _rank_fn(rank, world, overrides):
    from mhla_dist.config import load_config
    from mhla_dist.train import Trainer
    from mhla_dist.train.master_weights import master_state_dict

    trainer = Trainer(load_config(None, TINY_RUN + list(overrides)))
    start = master_state_dict(trainer.engine, trainer.topo.tp_group)
    trainer.train()
    return {"start": start}


LAYOUTS = {"1-zero0": (1, []), "cp2-zero1": (2, ["parallel.cp=2", "zero.stage=1"]),
           "tp2-zero3": (2, ["parallel.tp=2", "zero.stage=3"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_run_saves_and_starts_from_fp32_masters(tmp_path, layout):
    from mhla_dist.convert.zero import consolidate_zero_checkpoint

    world, extra = LAYOUTS[layout]
    data = corpus(tmp_path)
    common = ["train.precision=bf16", "optim.lr=1e-2", *extra, *data]
    run_ranks(_rank_fn, world, [f"run_dir={tmp_path / 'a'}", "train.steps=3", *common])
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    reference, _ = consolidate_zero_checkpoint(tmp_path / "a" / "checkpoints")
    assert saved.keys() == reference.keys()
    for name, w in saved.items():
        assert w.dtype == torch.float32 and torch.equal(w, reference[name]), name
    rounded = [n for n, w in saved.items() if not torch.equal(w, w.bfloat16().float())]
    assert len(rounded) > len(saved) // 2, "the masters should not be bf16 values"

    started = run_ranks(_rank_fn, world, [f"run_dir={tmp_path / 'b'}", "train.steps=1",
                                          f"init.weights={tmp_path / 'a' / 'model.safetensors'}",
                                          *common])
    for r in started:
        for name, w in saved.items():
            assert torch.equal(r["start"][name], w), f"{name}: the masters are not the file's"
