"""Learning-rate schedules, and the metrics logger (metrics.jsonl rows, wandb offline with a
run id that a resumed run reuses, the no-op logger)."""

import json
import math

import pytest

from mhla_dist.config import ScheduleConfig
from mhla_dist.train import learning_rate
from mhla_dist.train.metrics_log import MetricsLogger, NullLogger


def test_warmup_then_cosine_to_the_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(s, 110, 1.0, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_warmup_stable_decay():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [learning_rate(s, 100, 2.0, cfg) for s in range(100)]
    assert lrs[4] == pytest.approx(2.0) and set(lrs[5:80]) == {2.0}
    assert lrs[80] == pytest.approx(2.0 - 2.0 / 20) and lrs[99] == pytest.approx(0.0)
    assert learning_rate(50, 100, 3.0, ScheduleConfig(kind="constant")) == 3.0


def test_metrics_rows_and_offline_wandb_run_id(tmp_path):
    logger = MetricsLogger(tmp_path, "offline", "mhla-dist-test", None, {"a": 1})
    logger.log(1, {"loss": 2.5, "lr": 0.1, "grad_norm": float("nan")})
    logger.close()
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": "nan"}]
    assert any(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))
    resumed = MetricsLogger(tmp_path, "offline", "mhla-dist-test", None, {"a": 1})
    resumed.log(2, {"loss": 2.0})
    resumed.close()
    assert (tmp_path / "wandb_run_id.txt").read_text() == run_id
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_null_logger_takes_the_same_calls():
    logger = NullLogger()
    logger.log(1, {"loss": 1.0})
    logger.progress(1, 10, 1.0)
    logger.close()
