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
    return _percentile_ci(means, level)


def _percentile_ci(means: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of the bootstrap means."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def hierarchical_bootstrap_ci(x: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                              chunk: int = 100) -> tuple[float, float]:
    """Percentile CI of the mean of `x` [seeds, questions]: each draw resamples training seeds, then questions.

    Training seeds vary as much as the machine a user reruns on does (float rounding amplified by training
    acts like a new seed), so their spread belongs in the interval a user should expect. For a paired CI
    pass the per-seed, per-question differences. With one seed this is the question bootstrap."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected [seeds, questions] values, got shape {x.shape}")
    seeds, questions = x.shape
    if seeds == 1:
        return bootstrap_ci(x[0], n_boot, level, seed)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        s = rng.integers(0, seeds, size=(k, seeds))
        q = rng.integers(0, questions, size=(k, questions))
        means[start:start + k] = x[s[:, :, None], q[:, None, :]].mean(axis=(1, 2))
    return _percentile_ci(means, level)


def seed_std(x: np.ndarray) -> float:
    """Sample std (n - 1) of the per-seed means of `x` [seeds, questions]; 0 for one seed."""
    per_seed = np.asarray(x, dtype=np.float64).mean(axis=1)
    return float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
