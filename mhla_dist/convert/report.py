"""The account of an import: every source tensor mapped or dropped, every model tensor
created, and notes (GQA expansion, config choices)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class ConversionReport:
    mapped: list[dict] = field(default_factory=list)  # source -> target, shape, how
    created: list[dict] = field(default_factory=list)  # target, shape, how initialised
    dropped: list[dict] = field(default_factory=list)  # source, why
    notes: list[str] = field(default_factory=list)

    def map(self, source: str, target: str, tensor: torch.Tensor, how: str = "copied") -> None:
        self.mapped.append({"source": source, "target": target,
                            "shape": list(tensor.shape), "how": how})

    def create(self, target: str, tensor: torch.Tensor, how: str) -> None:
        self.created.append({"target": target, "shape": list(tensor.shape), "how": how})

    def drop(self, source: str, why: str) -> None:
        self.dropped.append({"source": source, "why": why})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def to_text(self) -> str:
        lines = [f"mapped {len(self.mapped)}, created {len(self.created)}, "
                 f"dropped {len(self.dropped)}"]
        lines += [f"  mapped   {m['source']} -> {m['target']} {m['shape']} ({m['how']})"
                  for m in self.mapped]
        lines += [f"  created  {c['target']} {c['shape']} ({c['how']})" for c in self.created]
        lines += [f"  dropped  {d['source']} ({d['why']})" for d in self.dropped]
        lines += [f"  note     {n}" for n in self.notes]
        return "\n".join(lines)
