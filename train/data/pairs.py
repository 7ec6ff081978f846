"""(positive, negative) rationale pairs of the same question: what the ranker and DPO train on.

A question with P positives and N negatives gives max(P, N) pairs (capped by `cap`): both lists
shuffled, then cycled, so every rationale is used and none twice more than needed. Questions with
only one kind cannot form a pair; they are skipped and counted. A `fraction` of questions, chosen by
a hash of question id and seed (so the split does not depend on data order), is held out.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from train.data.dataset import TokenizedSet, collate, read_prepared, tokenize_with
from train.errors import InputError


@dataclass
class PairSet:
    """(pos, neg) pairs over one tokenized set; `lengths` is what a pair costs in a padded batch."""

    seqs: TokenizedSet
    pos: np.ndarray
    neg: np.ndarray

    @property
    def ids(self) -> list[str]:
        return [f"{self.seqs.ids[p]}>{self.seqs.ids[n]}" for p, n in zip(self.pos, self.neg, strict=True)]

    @property
    def lengths(self) -> np.ndarray:
        lens = self.seqs.lengths
        return 2 * np.maximum(lens[self.pos], lens[self.neg])

    def __len__(self) -> int:
        return len(self.pos)

    def report(self) -> dict:
        return self.seqs.report()

    def batch(self, indices, pad_id: int, labels: bool = False) -> dict:
        """Rows 0..B-1 the positives, rows B..2B-1 their negatives, right padded (with `labels`: the
        rationale tokens as targets, for sequence log-probabilities)."""
        rows = np.concatenate([self.pos[indices], self.neg[indices]])
        b = collate(self.seqs, rows, pad_id, packing=False)
        return b if labels else {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def is_heldout(qid: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{qid}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def make_pairs(qids: list[str], labels: list[str], data: TokenizedSet, row_of: dict[str, int], ids: list[str],
               fraction: float, cap: int, seed: int) -> tuple[PairSet, PairSet, dict]:
    """Train and held-out pairs from rows (qid, label, id); rows missing from `data` are ignored."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for qid, label, rid in zip(qids, labels, ids, strict=True):
        if rid in row_of:
            groups.setdefault(qid, ([], []))[0 if label == "pos" else 1].append(row_of[rid])
    pairs = {False: ([], []), True: ([], [])}
    stats = {"questions": len(groups), "only_pos": 0, "only_neg": 0}
    for qid in sorted(groups):
        pos, neg = groups[qid]
        if not pos or not neg:
            stats["only_pos" if pos else "only_neg"] += 1
            continue
        rng = random.Random(f"{seed}:{qid}")
        rng.shuffle(pos)
        rng.shuffle(neg)
        n = max(len(pos), len(neg))
        n = min(n, cap) if cap > 0 else n
        held = is_heldout(qid, fraction, seed)
        pairs[held][0].extend(pos[k % len(pos)] for k in range(n))
        pairs[held][1].extend(neg[k % len(neg)] for k in range(n))

    def as_set(held: bool) -> PairSet:
        return PairSet(data, np.asarray(pairs[held][0], dtype=np.int64), np.asarray(pairs[held][1], dtype=np.int64))

    train, heldout = as_set(False), as_set(True)
    stats.update(train_pairs=len(train), heldout_pairs=len(heldout))
    return train, heldout, stats


def pairs_from_prepared(data_cfg, tok, fraction: float, cap: int, seed: int) -> tuple[PairSet, PairSet, dict]:
    """Train and held-out pairs of a prepared data set, tokenized with a stage's `data` settings; a data set
    in which no question has both kinds is an InputError naming it."""
    table = read_prepared(data_cfg.path, columns=["id", "qid", "label", "question", "rationale"])
    data = tokenize_with(table, tok, data_cfg)
    train, heldout, stats = make_pairs(table.column("qid").to_pylist(), table.column("label").to_pylist(), data,
                                       {rid: i for i, rid in enumerate(data.ids)}, table.column("id").to_pylist(),
                                       fraction, cap, seed)
    if len(train) == 0:
        raise InputError(data_cfg.path, None, f"no question has both a positive and a negative rationale "
                         f"({stats['only_pos']} only positive, {stats['only_neg']} only negative)", "empty_input")
    return train, heldout, stats
