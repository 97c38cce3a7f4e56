"""One tiny trained checkpoint per layout, shared by the conversion tests (spawning and
training is the slow part): TP = 2 with ZeRO-3 on 2 ranks, and TP = 1 with ZeRO-3 on
one process, the same seed, data and 2 optimizer steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.harness import run_ranks
from tests.train.runs import corpus, train_rank_fn

# Adam's eps well above the gradients' rounding noise: with eps=1e-8 an fp32 rounding
# difference in a near-zero gradient can flip an update's sign (a difference of lr).
STEPS = ["train.steps=2", "optim.eps=1e-3"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trained")
    data = corpus(tmp)
    run_ranks(train_rank_fn, 2, [f"run_dir={tmp / 'tp2'}", "parallel.tp=2", "zero.stage=3",
                                 *STEPS, *data])
    run_ranks(train_rank_fn, 1, [f"run_dir={tmp / 'tp1'}", "zero.stage=3", *STEPS, *data])
    return {"tp2": tmp / "tp2", "tp1": tmp / "tp1", "data": data, "tmp": tmp}
