"""Answer voting over sampled rationales: self-consistency (counts) and ASC (ranker-weighted).

Each candidate is (answer, correct, ranker score r). Candidates without an answer (no boxed
expression) do not vote. Candidates vote for their answer with a weight; the answers with the
largest total weight win, and a question scores (correct winners) / (winners): a tie between a
right and a wrong answer counts 1/2, as in the reference implementation.

Weights (the reference tried these four): with s = sigmoid(r), the ranker's probability that
the rationale is positive,
    count      1           (plain self-consistency, majority vote)
    score      s           (ASC, the default: votes weighted by the ranker instead of counted)
    1+score    1 + s
    1+2score   1 + 2s
`1+score` and `1+2score` keep the vote count in charge and let the ranker break near-ties.
Answers are grouped by their normalised text (the Hendrycks MATH normalisation, e.g. `0.5` and
`\\frac12` stay apart, `\\frac{1}{2}` and `\\frac12` merge); correctness comes from the grader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from train.data.graders import normalize_hendrycks

WEIGHTINGS = ("count", "score", "1+score", "1+2score")


@dataclass
class Candidate:
    answer: str | None
    correct: bool
    score: float = 0.0  # the ranker's raw output r (a logit); 0 when no ranker


def weight(kind: str, score: float) -> float:
    s = 1.0 / (1.0 + math.exp(-score))
    if kind == "count":
        return 1.0
    if kind == "score":
        return s
    if kind == "1+score":
        return 1.0 + s
    if kind == "1+2score":
        return 1.0 + 2.0 * s
    raise ValueError(f"unknown weighting {kind!r}; one of {', '.join(WEIGHTINGS)}")


def vote(candidates: Sequence[Candidate], kind: str = "count", rel_tol: float = 1e-9) -> float:
    """Expected accuracy of the weighted vote in [0, 1]; ties split fractionally."""
    totals: dict[str, float] = {}
    correct: dict[str, bool] = {}
    for c in candidates:
        if c.answer is None:
            continue
        key = normalize_hendrycks(c.answer)
        totals[key] = totals.get(key, 0.0) + weight(kind, c.score)
        correct[key] = correct.get(key, False) or c.correct
    if not totals:
        return 0.0
    best = max(totals.values())
    winners = [k for k, v in totals.items() if math.isclose(v, best, rel_tol=rel_tol, abs_tol=1e-12)]
    return sum(correct[k] for k in winners) / len(winners)


def any_correct(candidates: Sequence[Candidate]) -> float:
    """pass@n: 1 if some candidate is right (the ceiling of any vote)."""
    return float(any(c.correct for c in candidates))
