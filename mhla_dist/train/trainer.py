"""The trainer: topology -> task (model, data, loss) -> DeepSpeed engine -> the step loop.

One optimizer step, read top to bottom in `train_step`: for each micro-batch, the local
loss sum and element count; the count and the non-finite flag are all-reduced (count over
DP x CP, the flag over every rank); each rank back-propagates
`sum * (DP*CP) / global count` because DeepSpeed averages gradients over DP x CP, so the
gradient is that of the global mean. A non-finite loss on any rank skips the step on
every rank (with gradient accumulation, that micro-batch's backward is skipped and the
step uses the others); `train.max_nonfinite_steps` skips in a row stop the run.
"""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mhla_dist.config import Config, LMConfig, config_to_yaml
from mhla_dist.convert.universal import universal_checkpoint_info
from mhla_dist.parallel import DeepSpeedMPU, Topology, build_topology

from .checkpoint import find_resume, load_trainer_state, rng_state, save_checkpoint, set_rng_state
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
from .tasks import make_task

log = logging.getLogger("mhla_dist.train")


class NonFiniteLossError(RuntimeError):
    pass


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
        "zero_optimization": {"stage": cfg.zero.stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
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
            block_size=m.block_size if lm else None)
        deepspeed.init_distributed(dist_backend=self.topo.backend)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.topo.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        dist.barrier()
        _seed_everything(cfg.train.seed)  # the same initial weights on every rank
        self.task = make_task(cfg, self.topo)
        model = self.task.build_model()
        resume = find_resume(self.ckpt_dir, cfg.resume)
        self.start = plan_start(cfg, resume, self.topo)
        load_weights(self.start, model, cfg, self.topo)
        # Which tensors are split over TP, for DeepSpeed's universal checkpoint converter.
        model.universal_checkpoint_info = universal_checkpoint_info(model)
        groups = param_groups(model, cfg.optim.weight_decay, list(cfg.optim.no_decay))
        self.engine, *_ = deepspeed.initialize(
            model=model, config=deepspeed_config(cfg, self.start), mpu=DeepSpeedMPU(self.topo),
            model_parameters=[{k: g[k] for k in ("params", "weight_decay")} for g in groups])
        load_carried(self.start, self.engine, cfg, self.topo)
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
                               self.cfg.checkpoint.keep_last, config_to_yaml(self.cfg))

    # ------------------------------------------------------------------ the step
    def _global(self, values: list[float], group) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64, device=self.topo.device)
        dist.all_reduce(t, group=group)
        return t

    def train_step(self, batches) -> dict:
        cfg, topo = self.cfg, self.topo
        lr = learning_rate(self.step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = count_sum = 0.0
        skipped, grad_norm = False, None
        for micro in range(cfg.train.grad_accum):
            self.task.set_position(self.step, micro)
            total, count = self.task.loss(self.engine, next(batches))
            local_bad = 0.0 if bool(torch.isfinite(total)) else 1.0
            bad = self._global([local_bad], None)[0].item() > 0
            sums = self._global([0.0 if local_bad else total.item(), float(count)],
                                topo.dp_cp_group)
            if bad:
                skipped = True
            else:
                self.engine.backward(total * topo.dp_cp_size / sums[1])
                loss_sum, count_sum = loss_sum + sums[0].item(), count_sum + sums[1].item()
            if micro == cfg.train.grad_accum - 1 and cfg.zero.stage == 0 and not skipped:
                # ZeRO's optimizers report the norm; plain data parallelism does not.
                from deepspeed.runtime.utils import get_flattened_grad_norm

                grad_norm = get_flattened_grad_norm(list(self.engine.module.parameters()),
                                                    mpu=self.engine.mpu)
            if not bad or cfg.train.grad_accum > 1:
                self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return {"loss": loss_sum / count_sum if count_sum else float("nan"), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": skipped}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        batches = iter(self.eval_loader)
        loss_sum = count_sum = 0.0
        for _ in range(self.cfg.train.eval_steps):
            try:
                batch = next(batches)
            except StopIteration:
                break
            total, count = self.task.loss(self.engine, batch)
            sums = self._global([total.item(), float(count)], self.topo.dp_cp_group)
            loss_sum, count_sum = loss_sum + sums[0].item(), count_sum + sums[1].item()
        self.engine.train()
        return loss_sum / max(count_sum, 1.0)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        batches = iter(self.train_loader)
        samples, tokens = self.task.samples_and_tokens()
        samples *= self.topo.dp * cfg.train.grad_accum
        tokens *= self.topo.dp * cfg.train.grad_accum
        flops = self.task.flops_per_token()
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        while self.step < cfg.train.steps:
            out = self.train_step(batches)
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
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
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
                if (cfg.train.eval_interval and self.eval_loader is not None
                        and self.step % cfg.train.eval_interval == 0):
                    metrics["eval_loss"] = self.evaluate()
                self.logger.log(self.step, metrics)
                window_start, window_steps, window_losses = time.perf_counter(), 0, []
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
        if not cfg.checkpoint.interval or self.step % cfg.checkpoint.interval:
            self.save()
        self.save_consolidated(self.run_dir / "model.safetensors")
        self.logger.close()

    def save_consolidated(self, path: Path) -> None:
        """The full fp32 weights (ZeRO-3 partitions and TP shards gathered) as one
        safetensors file, with the model config as JSON beside it; written by rank 0."""
        import json

        import deepspeed
        from safetensors.torch import save_file

        from mhla_dist.parallel.tp_state import full_state_dict

        module = self.engine.module
        params = list(module.parameters())
        gathered = (deepspeed.zero.GatheredParameters(params) if self.cfg.zero.stage == 3
                    else contextlib.nullcontext())
        with gathered:
            state = full_state_dict(module, self.topo.tp_group)
        if self.topo.is_main:
            state = {k: v.float().contiguous() for k, v in state.items()}
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp), metadata={"format": "pt", "step": str(self.step)})
            tmp.replace(path)
            path.with_name("model_config.json").write_text(
                json.dumps(asdict(self.cfg.model), indent=1))
        dist.barrier()
