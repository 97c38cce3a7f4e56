"""Skipping an optimizer step whole, at any ZeRO stage, precision and accumulation.

A step with a non-finite loss in any micro-batch on any rank must leave the weights and
the optimizer state exactly as they were. DeepSpeed has no stage-agnostic way to drop a
step: its fp16 overflow path exists only for some stages and precisions, and skipping
`backward` / `step` calls breaks its accumulation bookkeeping (ZeRO-0's `clip_grad_norm_`
and ZeRO-1/2's grad-norm code fail on missing gradients). So the trainer runs every
micro-batch through DeepSpeed as usual (non-finite gradients included) and this gate
turns the *inner* torch optimizer's `step` into a no-op for that one step. Every
DeepSpeed wrapper (ZeRO 1-3, its bf16 optimizer, plain ZeRO-0) then does its usual
boundary work around an update that did not happen: the fp32 masters are unchanged, the
bf16 copies it refreshes from them are therefore unchanged too, the gradients are
zeroed, and Adam's moments and step count do not move.
"""

from __future__ import annotations

import contextlib

import torch


class OptimizerStepGate:
    """Wraps `optimizer.step` (the torch optimizer inside the engine) so that `skipping()`
    can drop one update."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected the engine's torch optimizer, got {type(optimizer)}")
        self._skip = False
        self.skipped = 0
        step = optimizer.step

        def gated_step(*args, **kwargs):
            if self._skip:
                self.skipped += 1
                return None
            return step(*args, **kwargs)

        optimizer.step = gated_step

    @contextlib.contextmanager
    def skipping(self, skip: bool):
        """Within the block, the inner optimizer's step does nothing when `skip`."""
        self._skip = skip
        try:
            yield
        finally:
            self._skip = False

    @classmethod
    def for_engine(cls, engine) -> OptimizerStepGate:
        return cls(engine.basic_optimizer)
