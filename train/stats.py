"""Confidence intervals for accuracies measured on a finite test set."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (one entry per question), resampling questions.

    Pass per-question differences between two variants for a paired CI: both answered the same
    questions, so the question-to-question spread cancels out of the difference."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)
