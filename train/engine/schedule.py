"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to `min_lr_ratio * lr`."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0, decay: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based); `decay` cosine or linear (REDI's recipe)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
