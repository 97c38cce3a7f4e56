"""Faults of a real cluster, through `launch/torchrun.sh` on 2 CPU processes (CP = 2).

- Preemption: SIGTERM or SIGUSR1 (twice) to the launcher, with no checkpoint due. The run saves the
  step it is in and exits 75; `resume=auto` then ends bit-equal to an unbroken run.
- A rank dies: MHLA_FAULT=kill@1:5 (SIGKILL) with `--max-restarts 1`. torchrun restarts
  both ranks; they resume from step 4 and end bit-equal to an unbroken run.
- A rank hangs: MHLA_FAULT=stall@1:3 with train.timeout_s=6. Both ranks stop within the
  timeout, naming step 3, with every thread's stack.
"""

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.train.launching import ROOT, launch_env, torchrun_command
from tests.train.runs import TINY_RUN, corpus

CONFIG = "configs/lm/tiny.yaml"


def _run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc) -> str:
    out = proc.stderr + proc.stdout
    assert proc.returncode == 0, out[-3000:]
    return out


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name, w in wa.items():
        assert torch.equal(w, wb[name]), name


def _rows(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("faults_data"))


def _overrides(data, run_dir, *extra):
    return [*TINY_RUN, *data, "parallel.cp=2", "logging.wandb.mode=disabled",
            f"run_dir={run_dir}", *extra]


PREEMPT_STEPS = ["train.steps=300", "checkpoint.interval=0"]  # no periodic checkpoint due


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("unbroken") / "run"
    _ok(_run(torchrun_command(CONFIG, _overrides(data, run_dir, *PREEMPT_STEPS)),
             launch_env(2)))
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_preempts_with_a_checkpoint_and_resume_is_bit_exact(tmp_path, data,
                                                                     unbroken, sig):
    steps, env = PREEMPT_STEPS, launch_env(2)
    run_dir = tmp_path / "pre"
    proc = subprocess.Popen(torchrun_command(CONFIG, _overrides(data, run_dir, *steps)),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(_rows(run_dir)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(sig)
    time.sleep(0.2)
    proc.send_signal(sig)  # a second signal during the save changes nothing
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped = _latest(run_dir)
    step = int(stopped.removeprefix("step"))
    assert 3 <= step < 300, stopped
    assert f"preempted: stopped after step {step}" in out
    assert not (run_dir / "model.safetensors").exists()

    out = _ok(_run(torchrun_command(CONFIG, _overrides(data, run_dir, *steps)), env))
    assert f"resumed from {run_dir / 'checkpoints' / stopped}" in out
    _assert_same_weights(unbroken, run_dir)


def test_a_killed_rank_is_restarted_and_the_run_ends_as_an_unbroken_one(tmp_path, data):
    steps = ["train.steps=8", "checkpoint.interval=2"]
    _ok(_run(torchrun_command(CONFIG, _overrides(data, tmp_path / "ref", *steps)),
             launch_env(2)))
    run_dir = tmp_path / "killed"
    out = _ok(_run(torchrun_command(CONFIG, _overrides(data, run_dir, *steps),
                                    "--max-restarts", "1"),
                   launch_env(2, MHLA_FAULT="kill@1:5")))
    assert "injected fault: kill at step 5" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step00000004'}" in out
    assert [r["step"] for r in _rows(run_dir)][-4:] == [5, 6, 7, 8]
    _assert_same_weights(tmp_path / "ref", run_dir)


def test_a_stalled_rank_stops_every_rank_within_the_timeout(tmp_path, data):
    start = time.monotonic()
    proc = _run(torchrun_command(CONFIG, _overrides(data, tmp_path / "hang", "train.steps=6",
                                                    "train.timeout_s=6")),
                launch_env(2, MHLA_FAULT="stall@1:3"), timeout=180)
    elapsed = time.monotonic() - start
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s"
    for rank in (0, 1):
        assert f"rank {rank}: step 3" in out, out[-4000:]
    assert "most recent call first" in out  # faulthandler's stack dump
