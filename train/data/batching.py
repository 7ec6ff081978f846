"""Batches under a token budget: length-grouped (padded) or packed (one unpadded row per batch).

The batch list of an epoch depends only on (lengths, max_tokens, seed, epoch), never on the
world size, so a run can resume on a different number of ranks: its position is the number of
samples consumed, which maps back to a batch index through the prefix sums of batch sizes.

Ranks share the batch list: optimizer step `s` uses batches `[s*W*A, (s+1)*W*A)` and rank `r`
takes every W-th of them (its A micro-batches). Batches that do not fill a whole step at the
end of an epoch are dropped (at most W*A - 1 batches an epoch).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class TokenBudgetBatcher:
    def __init__(self, lengths, max_tokens: int, seed: int = 0, packing: bool = False, group_size: int = 512,
                 shuffle: bool = True, index: np.ndarray | None = None):
        """`index`: batch only these samples (e.g. the training ones, not the held-out); batches hold indices
        into `lengths` either way."""
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.index is not None:
            self.lengths = self.lengths[self.index]
        if len(self.lengths) == 0:
            raise ValueError("no samples to batch")
        too_long = int(self.lengths.max())
        if too_long > max_tokens:
            raise ValueError(f"a sample has {too_long} tokens but data.max_tokens is {max_tokens}; "
                             "raise max_tokens or lower data.max_len")
        self.max_tokens, self.seed, self.packing = max_tokens, seed, packing
        self.group_size, self.shuffle = max(1, group_size), shuffle
        self._cache = lru_cache(maxsize=2)(self._build)

    def _build(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            batches = self._greedy(order, lambda count, longest, total: total)
        else:
            windows = [order[i:i + self.group_size] for i in range(0, n, self.group_size)]
            grouped = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")] for w in windows])
            batches = self._greedy(grouped, lambda count, longest, total: count * longest)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
        if self.index is not None:
            batches = [self.index[b] for b in batches]
        return batches, np.concatenate([[0], np.cumsum(sizes)])

    def _greedy(self, order: np.ndarray, cost) -> list[np.ndarray]:
        """Cut `order` left to right into batches whose cost stays within the token budget."""
        batches, start, longest, total = [], 0, 0, 0
        for pos, i in enumerate(order):
            length = int(self.lengths[i])
            new_longest, new_total = max(longest, length), total + length
            if pos > start and cost(pos - start + 1, new_longest, new_total) > self.max_tokens:
                batches.append(order[start:pos])
                start, new_longest, new_total = pos, length, length
            longest, total = new_longest, new_total
        batches.append(order[start:])
        return batches

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self._cache(epoch)[0]

    def steps_in_epoch(self, epoch: int, world: int, accum: int = 1) -> int:
        """Whole optimizer steps in `epoch` (grouping differs per epoch, so the count may too)."""
        return len(self.batches(epoch)) // (world * accum)

    def samples_before(self, epoch: int, batch_index: int) -> int:
        return int(self._cache(epoch)[1][batch_index])

    def batch_index_at(self, epoch: int, samples_consumed: int) -> int:
        """Inverse of samples_before; the position must be a batch boundary of this epoch."""
        prefix = self._cache(epoch)[1]
        idx = int(np.searchsorted(prefix, samples_consumed))
        if idx >= len(prefix) or prefix[idx] != samples_consumed:
            raise ValueError(f"{samples_consumed} samples is not a batch boundary of epoch {epoch}; "
                             "was the data, max_tokens or packing changed since the checkpoint?")
        return idx

    def step_batches(self, epoch: int, step: int, world: int, rank: int, accum: int = 1) -> list[np.ndarray]:
        """The `accum` micro-batches of `rank` for optimizer step `step` of `epoch`."""
        first = step * world * accum
        batches = self.batches(epoch)
        return [batches[first + a * world + rank] for a in range(accum)]


def pad_fraction(batches: list[np.ndarray], lengths: np.ndarray, packing: bool) -> float:
    """Share of positions in the model's input that are padding (a packed batch is one unpadded row)."""
    if packing:
        return 0.0
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / padded


def global_max_pad_fraction(lengths: np.ndarray) -> float:
    """What padding every sample to the data set's longest (the reference implementation) wastes."""
    return 1.0 - float(lengths.mean()) / float(lengths.max())
