"""launch/torchrun.sh and launch/deepspeed.sh run the trainer on 2 CPU processes (CP = 2)
and agree step for step, even where a killed build of DeepSpeed's CPU shared-memory op left
its lock behind (the trainer never builds that op); a bad config stops
`python -m mhla_dist.train` with exit code 2."""

import json
import subprocess
import sys

from tests.train.launching import ROOT, launch_env
from tests.train.runs import TINY_RUN, corpus


def _launch(script, tmp_path, name, data):
    # The lock file an interrupted `deepspeed_shm_comm` JIT build leaves: a start that
    # built the op would wait on it until the timeout.
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    env = launch_env(TORCH_EXTENSIONS_DIR=str(extensions))
    run_dir = tmp_path / name
    cmd = ["bash", str(ROOT / "launch" / script), "--config", "configs/lm/tiny.yaml",
           *TINY_RUN, *data, "parallel.cp=2", "train.steps=3", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_and_deepspeed_launchers_agree(tmp_path):
    data = corpus(tmp_path)
    a = _launch("torchrun.sh", tmp_path, "torchrun", data)
    b = _launch("deepspeed.sh", tmp_path, "deepspeed", data)
    assert len(a) == 3 and a == b


def test_bad_config_exits_with_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "mhla_dist.train", "--config",
                           "configs/lm/tiny.yaml", "parallel.cp=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parallel.cp=3 does not divide the 8 blocks" in proc.stderr
