"""Where a training step's time goes: module hooks timing the attention layers, the MLPs
and the embedding + norms of an LM, forward and backward (for `tools/bench_train.py`).

Head + loss is the rest of the forward+backward (the output projection on the vocabulary,
the cross-entropy, residual adds); the optimizer is timed on its own. Within the attention
layers their linear projections (q, k, v, the gate, the output) are timed as well, a
share of the attention's time (`projections_ms`), not a part of its own.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict


class ModuleTimer:
    """Wall time of module groups, forward and backward, from module hooks.

    A backward runs from the module's backward pre-hook (its output gradients are ready) to
    its backward hook (its input gradients are). A module whose inputs need no gradient
    (the embedding) has its backward hook called at once, before its weight gradient
    exists: its backward lasts until `finish()` instead (it runs last: the embedding is
    the first op of the forward).
    """

    def __init__(self, groups: dict, sync) -> None:
        self.sync, self.totals, self.open, self.handles = sync, defaultdict(float), {}, []
        self.owner = {id(m): name for name, modules in groups.items() for m in modules}
        for name, modules in groups.items():
            for m in modules:
                self.handles += [
                    m.register_forward_pre_hook(self._opener(m, "forward")),
                    m.register_forward_hook(self._closer(m, name, "forward")),
                    m.register_full_backward_pre_hook(self._opener(m, "backward")),
                    m.register_full_backward_hook(self._closer(m, name, "backward")),
                ]

    def _opener(self, module, phase):
        def hook(*_):
            self.sync()
            self.open[id(module), phase] = time.perf_counter()
        return hook

    def _closer(self, module, name, phase):
        def hook(_module, inputs, _outputs):
            if phase == "backward" and all(g is None for g in inputs):
                return  # no input gradient: the backward goes on past this hook
            self.sync()
            t0 = self.open.pop((id(module), phase))
            self.totals[name, phase] += time.perf_counter() - t0
        return hook

    def finish(self) -> None:
        """Close the backwards still open (see the class docstring)."""
        self.sync()
        now = time.perf_counter()
        for (key, phase), t0 in self.open.items():
            self.totals[self.owner[key], phase] += now - t0
        self.open.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


NESTED = "attention projections"


def module_groups(model) -> dict:
    """attention, mlp, embedding + norms: the decoder layers' `attn` and `mlp`, and every
    other child of the layers and of the model (embedding, norms) except the layers and an
    untied head (whose time, with the loss, is the forward+backward's rest); and, nested in
    the attention, its `*_proj` linears."""
    groups = {"attention": [], "mlp": [], "embedding+norms": [], NESTED: []}
    for layer in model.layers:
        for name, child in layer.named_children():
            groups[{"attn": "attention", "mlp": "mlp"}.get(name, "embedding+norms")].append(child)
        groups[NESTED] += [m for name, m in layer.attn.named_children()
                           if name.endswith("_proj")]
    for name, child in model.named_children():
        if name not in ("layers", "head"):
            groups["embedding+norms"].append(child)
    return groups


def breakdown(model, fwd_bwd, optim, steps: int, sync) -> dict:
    """Median milliseconds per group over `steps` hooked steps (see `ModuleTimer`)."""
    groups = module_groups(model)
    timer = ModuleTimer(groups, sync)
    rows = []
    try:
        for _ in range(steps):
            timer.totals.clear()
            sync()
            t0 = time.perf_counter()
            fwd_bwd()
            timer.finish()
            t1 = time.perf_counter()
            optim()
            sync()
            t2 = time.perf_counter()
            row = {f"{name}_{phase}": 1e3 * t for (name, phase), t in timer.totals.items()}
            hooked = sum(t for (name, _), t in timer.totals.items() if name != NESTED)
            row["head+loss_rest"] = 1e3 * (t1 - t0 - hooked)
            row["optimizer"], row["total"] = 1e3 * (t2 - t1), 1e3 * (t2 - t0)
            rows.append(row)
    finally:
        timer.remove()
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
    parts = {}
    for name in groups:
        fwd, bwd = med.get(f"{name}_forward", 0.0), med.get(f"{name}_backward", 0.0)
        parts[name] = {"forward_ms": fwd, "backward_ms": bwd, "ms": fwd + bwd}
    parts["attention"]["projections_ms"] = parts.pop(NESTED)["ms"]
    parts["head+loss"] = {"ms": med["head+loss_rest"]}
    parts["optimizer"] = {"ms": med["optimizer"]}
    parts_ms = sum(p["ms"] for p in parts.values())
    for p in parts.values():
        p["fraction"] = p["ms"] / parts_ms
    return {"parts": parts, "total_ms": med["total"], "steps": steps}
