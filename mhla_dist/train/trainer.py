"""The trainer: topology -> task (model, data, loss) -> DeepSpeed engine -> the step loop.

One optimizer step, read top to bottom in `train_step`:
1. Its `train.grad_accum` micro-batches are read first, and their global element count
   (target tokens, or clip values for the DiT) is all-reduced over DP x CP once.
2. Each micro-batch's local loss sum is back-propagated as
   `sum * (DP*CP) / step count`: DeepSpeed averages gradients over DP x CP, so the
   gradient is that of the mean over every element of the whole step, however the
   elements fall into micro-batches (padding) and ranks.
3. One all-reduce over every rank: is any micro-batch's loss non-finite anywhere, and
   the step's loss sum. A non-finite step is skipped whole on every rank: its gradients
   (non-finite ones included) went through DeepSpeed as usual, but the optimizer update
   is dropped (`step_gate.py`), so weights and Adam's moments and step count stay
   exactly as they were and the gradients are zeroed. The step still counts: its data
   are consumed, `step` advances, and the learning rate, a function of `step`, is the
   schedule's for the next step as if nothing happened. `train.max_nonfinite_steps`
   skips in a row stop the run.
The logged loss is the global mean of the step; evaluation scores the same eval batches
(and, for the DiT, the same noise and timesteps) every time.

Preemption: SIGTERM or SIGUSR1 on any rank sets a flag that rides on the step's closing
all-reduce; every rank then saves a complete checkpoint of that step and `train()`
returns "preempted" (`python -m mhla_dist.train` exits with `PREEMPTED_EXIT_CODE`). A
step past `train.timeout_s` stops the rank with its stacks dumped (`watchdog.py`).
"""

from __future__ import annotations

import faulthandler
import logging
import random
import resource
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mhla_dist.config import Config, LMConfig, config_to_yaml
from mhla_dist.convert.universal import universal_checkpoint_info
from mhla_dist.parallel import DeepSpeedMPU, Topology, build_topology, init_deepspeed_comm

from .checkpoint import (
    find_resume,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .faults import FaultInjector
from .master_weights import master_state_dict, set_master_weights
from .metrics_log import MetricsLogger, NullLogger
from .param_groups import apply_hyperparameters, param_groups
from .schedule import learning_rate
from .start import (
    StartPlan,
    deepspeed_checkpoint_config,
    describe,
    load_carried,
    load_weights,
    plan_start,
)
from .step_gate import OptimizerStepGate
from .tasks import make_task
from .watchdog import StepWatchdog

log = logging.getLogger("mhla_dist.train")
# EX_TEMPFAIL: stopped on a preemption signal after a complete checkpoint; resume=auto
# continues from it.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    pass


def zero_config(cfg: Config) -> dict:
    z = cfg.zero
    out = {"stage": z.stage}
    if z.stage > 0:
        out.update(overlap_comm=z.overlap_comm, contiguous_gradients=z.contiguous_gradients,
                   reduce_bucket_size=z.reduce_bucket_size)
        if z.stage < 3:
            out["allgather_bucket_size"] = z.allgather_bucket_size
    return out


def precision_config(cfg: Config) -> dict:
    """bf16 runs keep fp32 masters (DeepSpeed's bf16 optimizers), reduce gradients in
    `zero.reduce_dtype` and, at ZeRO-2/3, accumulate them over micro-batches in fp32
    (`data_types.grad_accum_dtype`). DeepSpeed 0.19 refuses fp32 accumulation at ZeRO-0,
    and at ZeRO-1 swaps in its BF16_Optimizer, whose checkpoints its own zero_to_fp32
    cannot read: those two stages accumulate in bf16."""
    if cfg.train.precision != "bf16":
        return {"bf16": {"enabled": False}}
    out = {"bf16": {"enabled": True}, "communication_data_type": cfg.zero.reduce_dtype}
    if cfg.zero.stage >= 2:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def deepspeed_config(cfg: Config, start: StartPlan | None = None) -> dict:
    o = cfg.optim
    return {
        "checkpoint": deepspeed_checkpoint_config(start) if start else {},
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # DeepSpeed 0.19 clips to 1.0 unless told: always say what the config says.
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True}},
        "zero_optimization": zero_config(cfg),
        **precision_config(cfg),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    def __init__(self, cfg: Config) -> None:
        import deepspeed

        self.cfg = cfg
        m = cfg.model
        lm = isinstance(m, LMConfig)
        self.topo: Topology = build_topology(
            cfg.parallel.tp, cfg.parallel.cp, num_heads=m.num_heads,  # DiT: checked by config
            seq_len=(cfg.data.seq_len or m.max_seq_len) if lm else None,
            block_size=m.block_size if lm else None, timeout_s=cfg.train.timeout_s)
        init_deepspeed_comm(self.topo.backend)
        self.faults = FaultInjector(self.topo.rank)
        self._signal: int | None = None
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.topo.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        dist.barrier()
        _seed_everything(cfg.train.seed)  # the same initial weights on every rank
        self.task = make_task(cfg, self.topo)
        model = self.task.build_model()
        resume = self._find_resume()
        self.start = plan_start(cfg, resume, self.topo)
        initial = load_weights(self.start, model, cfg, self.topo)
        # Which tensors are split over TP, for DeepSpeed's universal checkpoint converter.
        model.universal_checkpoint_info = universal_checkpoint_info(model)
        groups = param_groups(model, cfg.optim.weight_decay, list(cfg.optim.no_decay),
                              cfg.optim.mixing_lr_scale)
        self.param_group_names = [g["names"] for g in groups]
        self.lr_scales = [g["lr_scale"] for g in groups]
        self.engine, *_ = deepspeed.initialize(
            model=model, config=deepspeed_config(cfg, self.start), mpu=DeepSpeedMPU(self.topo),
            model_parameters=[{k: g[k] for k in ("params", "weight_decay")} for g in groups])
        if initial is not None:
            set_master_weights(self.engine, initial, self.topo.tp_group)
        load_carried(self.start, self.engine, cfg, self.topo)
        self.step_gate = OptimizerStepGate.for_engine(self.engine)
        apply_hyperparameters(self.engine.optimizer, groups, cfg.optim.betas, cfg.optim.eps)
        log.info("%s", describe(self.start, self.topo))
        self.step, self.skipped, self.nonfinite_streak = 0, 0, 0
        self.train_loader = self.task.loader("train")
        if self.train_loader is None:
            raise ValueError("data.train is empty: give the training shards (a path, a brace "
                             "pattern like shard-{000000..000009}.tar, or pipe:...)")
        self.eval_loader = self.task.loader("eval")
        if resume is not None:
            self._restore(resume)
        self.logger = (MetricsLogger(self.run_dir, cfg.logging.wandb.mode,
                                     cfg.logging.wandb.project, cfg.logging.wandb.name,
                                     asdict(cfg))
                       if self.topo.is_main else NullLogger())

    # ------------------------------------------------------------------ checkpoints
    def _find_resume(self) -> Path | None:
        """Rank 0 finds (and verifies: every file hashed once) the checkpoint to resume;
        the others take its answer, or its error."""
        answer = [None]
        if self.topo.is_main:
            for stale in (self.ckpt_dir.glob(".step*.saving") if self.ckpt_dir.is_dir()
                          else []):
                log.warning("removing %s: a save that did not finish", stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                found = find_resume(self.ckpt_dir, self.cfg.resume)
                answer = [("ok", None if found is None else str(found))]
            except (OSError, RuntimeError) as exc:
                answer = [("error", f"{type(exc).__name__}: {exc}")]
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise RuntimeError(value)
        return None if value is None else Path(value)

    def trainer_state(self) -> dict:
        return {"step": self.step, "skipped": self.skipped,
                "nonfinite_streak": self.nonfinite_streak,
                "train_loader": self.train_loader.state_dict(), "rng": rng_state()}

    def _restore(self, path: Path) -> None:
        state = load_trainer_state(path)
        self.step, self.skipped = state["step"], state["skipped"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.train_loader.load_state_dict(state["train_loader"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        return save_checkpoint(self.engine, self.ckpt_dir, self.step, self.trainer_state(),
                               self.cfg.checkpoint.keep_last, config_to_yaml(self.cfg),
                               self.param_group_names, device=self.topo.device,
                               fault=self.faults)

    # ------------------------------------------------------------------ the step
    def _all_reduce(self, values: list[torch.Tensor | float], group=None) -> torch.Tensor:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
        t = t.to(self.topo.device)
        dist.all_reduce(t, group=group)
        return t

    def _replica_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` as counted once per DP x CP rank: TP ranks hold the same tokens, so only
        TP rank 0 contributes to a sum taken over every rank."""
        return value if self.topo.tp_rank == 0 else torch.zeros_like(value)

    def train_step(self, batches, want_grad_norm: bool = True) -> dict:
        """One optimizer step; its one blocking host sync is the closing all-reduce (the
        grad norm, wanted for logging only, may add DeepSpeed's own)."""
        cfg, topo = self.cfg, self.topo
        lr = learning_rate(self.step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
        for group, scale in zip(self.engine.optimizer.param_groups, self.lr_scales,
                                strict=True):
            group["lr"] = lr * scale
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        # Known from the (host) targets before any forward: one all-reduce for the step,
        # at least 1 (a step whose every target is padding gives zero gradients, not NaN).
        count = self._all_reduce([sum(self.task.count(b) for b in micro)],
                                 topo.dp_cp_group)[0].clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=topo.device)
        for i, batch in enumerate(micro):
            self.task.set_position(self.step, i)
            total, _ = self.task.loss(self.engine, batch)
            # scale_wrt_gas=False: the division by the step's count already averages
            # over the micro-batches.
            self.engine.backward(total * (topo.dp_cp_size / count).to(total.dtype),
                                 scale_wrt_gas=False)
            loss_sum = loss_sum + total.detach().double()
            if i < len(micro) - 1:
                self.engine.step()
        finite = torch.isfinite(loss_sum)
        closing = self._all_reduce(
            [(~finite).double(), torch.where(finite, self._replica_sum(loss_sum), 0.0),
             float(self._signal is not None)])
        bad, total, preempt, count = torch.cat([closing, count.view(1)]).tolist()  # the sync
        skipped = bad > 0
        grad_norm = None
        if want_grad_norm and cfg.zero.stage == 0 and not skipped:
            # ZeRO's optimizers report the norm; plain data parallelism does not.
            from deepspeed.runtime.utils import get_flattened_grad_norm

            grad_norm = get_flattened_grad_norm(list(self.engine.module.parameters()),
                                                mpu=self.engine.mpu)
        with self.step_gate.skipping(skipped):
            self.engine.step()
        if want_grad_norm and grad_norm is None and not skipped:
            grad_norm = self.engine.get_global_grad_norm()
        return {"loss": float("nan") if skipped else total / count, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": skipped, "preempt": preempt > 0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval_loss`, the mean loss over the first `train.eval_steps` eval batches (and
        the task's other eval metrics, e.g. MQAR's `eval_accuracy`): the same batches (and
        the same noise and timesteps for the DiT) at every evaluation, so the curve
        compares steps; the training loader and the RNG are not touched."""
        self.engine.eval()
        self.eval_loader.rewind()
        batches = iter(self.eval_loader)
        names = ["loss", *self.task.eval_metric_names()]
        sums = torch.zeros(2 * len(names), dtype=torch.float64, device=self.topo.device)
        try:
            for index in range(self.cfg.train.eval_steps):
                batch = next(batches, None)
                if batch is None:
                    break
                self.task.set_position(None, index)
                pairs = [self.task.loss(self.engine, batch),
                         *self.task.eval_metrics(self.engine, batch).values()]
                sums += self._replica_sum(torch.stack([t.double().to(sums.device)
                                                       for pair in pairs for t in pair]))
        finally:
            batches.close()
        dist.all_reduce(sums)
        self.engine.train()
        totals = sums.tolist()
        return {f"eval_{name}": totals[2 * i] / max(totals[2 * i + 1], 1.0)
                for i, name in enumerate(names)}

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        if self._signal is None:
            log.warning("rank %d received %s: saving a checkpoint at the end of this step, "
                        "then stopping", self.topo.rank, signal.Signals(signum).name)
        self._signal = signum  # a second signal changes nothing: the save goes on

    def train(self) -> str:
        """Train to `train.steps`; returns "done", or "preempted" after a preemption
        signal (a complete checkpoint of the step reached was saved)."""
        previous = {s: signal.signal(s, self._on_signal) for s in PREEMPTION_SIGNALS}
        watchdog = StepWatchdog(self.cfg.train.timeout_s, self.topo.rank)
        try:
            return self._train(watchdog)
        finally:
            watchdog.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _train(self, watchdog: StepWatchdog) -> str:
        cfg = self.cfg
        batches = iter(self.train_loader)
        samples, tokens = self.task.samples_and_tokens()
        samples *= self.topo.dp * cfg.train.grad_accum
        tokens *= self.topo.dp * cfg.train.grad_accum
        flops = self.task.flops_per_token()
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        while self.step < cfg.train.steps:
            watchdog.beat(self.step + 1)
            self.faults.at_step(self.step + 1)
            eval_due = bool(cfg.train.eval_interval and self.eval_loader is not None
                            and (self.step + 1) % cfg.train.eval_interval == 0)
            log_due = (eval_due or (self.step + 1) % cfg.logging.interval == 0
                       or self.step + 1 == cfg.train.steps)
            try:
                out = self.train_step(batches, want_grad_norm=log_due)
            except RuntimeError:  # e.g. a collective that timed out waiting for a peer
                log.error("rank %d: step %d failed; every thread's stack follows",
                          self.topo.rank, self.step + 1)
                faulthandler.dump_traceback(all_threads=True)
                raise
            self.step += 1
            window_steps += 1
            if not out["skipped"]:
                window_losses.append(out["loss"])
            if out["skipped"]:
                self.skipped += 1
                self.nonfinite_streak += 1
                log.warning("step %d: non-finite loss on some rank; step skipped on all ranks",
                            self.step)
                if self.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} steps in a row had a non-finite loss "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopping")
            else:
                self.nonfinite_streak = 0
            self.logger.progress(self.step, cfg.train.steps, out["loss"])
            if log_due:
                elapsed = time.perf_counter() - window_start
                per_s = window_steps / max(elapsed, 1e-9)
                # The mean over the steps since the last row: one step's loss is noisy.
                loss = sum(window_losses) / len(window_losses) if window_losses else out["loss"]
                metrics = {"loss": loss, "lr": out["lr"], "grad_norm": out["grad_norm"],
                           "tokens_per_s": tokens * per_s, "samples_per_s": samples * per_s,
                           "skipped_steps": self.skipped,
                           "memory_gb": _peak_memory_bytes(self.topo.device) / 2**30}
                if cfg.logging.peak_flops > 0:
                    metrics["mfu"] = (flops * tokens * per_s
                                      / (cfg.logging.peak_flops * self.topo.world_size))
                if eval_due:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                window_start, window_steps, window_losses = time.perf_counter(), 0, []
            path = None
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                path = self.save()
            if out["preempt"]:
                path = path or self.save()
                log.warning("preempted: stopped after step %d with its checkpoint %s complete; "
                            "resume=auto continues from it (exit code %d)", self.step, path,
                            PREEMPTED_EXIT_CODE)
                self.logger.close()
                return "preempted"
        if not cfg.checkpoint.interval or self.step % cfg.checkpoint.interval:
            self.save()
        self.save_consolidated(self.run_dir / "model.safetensors")
        self.logger.close()
        return "done"

    def save_consolidated(self, path: Path) -> None:
        """The full fp32 master weights (from ZeRO's fp32 partitions or DeepSpeed's bf16
        optimizer, TP shards gathered; a bf16 run's module holds only rounded copies) as
        one safetensors file, with the model config as JSON beside it; written by rank 0."""
        import json

        from safetensors.torch import save_file

        state = master_state_dict(self.engine, self.topo.tp_group)
        if self.topo.is_main:
            state = {k: v.contiguous() for k, v in state.items()}
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp), metadata={"format": "pt", "step": str(self.step)})
            tmp.replace(path)
            path.with_name("model_config.json").write_text(
                json.dumps(asdict(self.cfg.model), indent=1))
        dist.barrier()
