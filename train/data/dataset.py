"""Prepared data -> token ids -> model batches. The prompt format every stage uses lives here.

A sample is `BOS + question + "\\n"` (the prompt) followed by `rationale + EOS` (the target),
cut to `max_len` tokens. Batches are either padded to their own longest sample, or packed into
one row with position ids restarting per sample (transformers then keeps attention within each
sample: block-diagonal under SDPA/eager, varlen under flash-attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from train.errors import InputError

IGNORE = -100


def target_mask(batch: dict):
    """[B, L-1] bool: positions whose next token is a target (rationale) token, i.e. labels[:, 1:] != IGNORE."""
    return batch["labels"][:, 1:] != IGNORE


def prompt_text(question: str) -> str:
    """The text the model sees before the rationale: one function for training and evaluation."""
    return question + "\n"


def prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of each question's prompt (BOS + prompt_text): what training and generation both feed."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + p for p in tokenizer([prompt_text(q) for q in questions], add_special_tokens=False)["input_ids"]]


def read_prepared(path: str | Path, labels: tuple[str, ...] = ("pos", "neg"), columns: list[str] | None = None):
    """The prepared rows whose label is in `labels`, as a pyarrow Table in file order."""
    p = Path(path)
    shards = sorted(p.glob("data-*.parquet"))
    if not (p / "DONE.json").is_file() or not shards:
        raise InputError(str(p), None, "not a finished `tdg prepare` output (no DONE.json or data shards)",
                         "not_prepared")
    table = pq.read_table(shards, columns=columns)
    return table.filter(pc.is_in(table["label"], value_set=pa.array(list(labels))))


@dataclass
class TokenizedSet:
    ids: list[str]
    input_ids: list[np.ndarray]  # prompt + target, int32
    prompt_lens: np.ndarray  # tokens of each sample that are prompt
    dropped: int  # samples whose prompt alone filled max_len (no target tokens left)
    cut: int = 0  # samples kept but cut at max_len (their rationale's end, with the answer, is lost)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def describe(self, max_len: int) -> str:
        """What tokenizing did to the data, for the job log: cuts at max_len are silent otherwise."""
        share = 100 * self.cut / max(len(self) + self.dropped, 1)
        return (f"{len(self)} samples, {int(self.lengths.sum()):,} tokens; {self.cut} ({share:.1f}%) cut at "
                f"data.max_len={max_len}, {self.dropped} left out (the prompt alone reaches it)")


def tokenize(table, tokenizer, max_len: int) -> TokenizedSet:
    """Tokenize prompts and rationales in batch (fast tokenizer), concatenate, cut to max_len."""
    questions = table.column("question").to_pylist()
    rationales = table.column("rationale").to_pylist()
    row_ids = table.column("id").to_pylist()
    eos = tokenizer.eos_token_id
    p_ids = prompt_ids(tokenizer, questions)
    r_ids = tokenizer(rationales, add_special_tokens=False)["input_ids"]
    ids, seqs, plens, dropped, cut = [], [], [], 0, 0
    for rid, prompt, r in zip(row_ids, p_ids, r_ids, strict=True):
        if len(prompt) >= max_len:
            dropped += 1
            continue
        seq = np.asarray((prompt + r + [eos])[:max_len], dtype=np.int32)
        cut += len(prompt) + len(r) + 1 > max_len
        ids.append(rid)
        seqs.append(seq)
        plens.append(len(prompt))
    return TokenizedSet(ids, seqs, np.asarray(plens, dtype=np.int64), dropped, cut)


def collate(data: TokenizedSet, indices, pad_id: int, packing: bool, mask_prompt: bool = True) -> dict:
    """Build model inputs for the samples `indices`: labels are IGNORE on prompt and padding."""
    import torch

    seqs = [data.input_ids[i] for i in indices]
    plens = [int(data.prompt_lens[i]) if mask_prompt else 1 for i in indices]
    if packing:
        input_ids = np.concatenate(seqs)
        labels = input_ids.astype(np.int64)
        position_ids = np.concatenate([np.arange(len(s)) for s in seqs])
        starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])[:-1]])
        for start, plen in zip(starts, plens, strict=True):
            labels[start:start + plen] = IGNORE  # also cuts the link between neighbouring samples
        return {"input_ids": torch.from_numpy(input_ids.astype(np.int64))[None],
                "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(position_ids)[None]}
    longest = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), longest), IGNORE, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for row, (s, plen) in enumerate(zip(seqs, plens, strict=True)):
        input_ids[row, :len(s)] = s
        labels[row, plen:len(s)] = s[plen:]
        mask[row, :len(s)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}
