"""Feature maps `phi` applied by the attention layer to q and k before the operator."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("relu", "elu", "identity")


def feature_map(name: str, *, eps: float = 1e-6, normalize: bool = True) -> Callable:
    """`relu`: `relu(x) + eps`; `elu`: `elu(x) + 1`; `identity` (only with normalize=False:
    a signed feature map can zero the denominator)."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map={name!r} is not one of {', '.join(FEATURE_MAPS)}")
    if name == "identity":
        if normalize:
            raise ValueError(
                "feature_map='identity' needs normalize=False: signed features can make the "
                "denominator phi(q)^T y zero"
            )
        return lambda x: x
    if name == "elu":
        return lambda x: F.elu(x) + 1
    return lambda x: torch.relu(x) + eps
