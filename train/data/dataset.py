"""Prepared data -> token ids -> model batches. How a sample becomes tokens lives here.

A sample is `BOS + prompt` followed by `rationale + EOS` (the target), where the prompt is the
question rendered through `data.prompt_template` (`train.data.prompt`). Prompt and rationale are
tokenized as one text, as a user's tokenizer would see it, and the prompt's own ids are checked
to be a prefix of it, so the rationale starts exactly where the prompt ends (a Llama tokenizer
would otherwise give a rationale tokenized alone a leading space it never has in the text). The
rare sample whose tokens straddle that boundary is tokenized in two parts instead.

A sample longer than `max_len` is dropped and counted (`data.overlong=drop`, the default: a cut
rationale loses its final answer, and a negative exactly the wrong ending the method learns
from) or cut to `max_len` without EOS (`truncate`). Training samples and eval candidates go
through the same `tokenize`, so the ranker never sees an ending at test time that training
did not have: EOS marks a finished rationale, in both.

Batches are either padded to their own longest sample, or packed into one row with position
ids restarting per sample (transformers then keeps attention within each sample:
block-diagonal under SDPA/eager, varlen under flash-attention).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from train.data.prompt import DEFAULT_TEMPLATE, Prompt, as_prompt
from train.errors import InputError
from train.manifest import read_done

IGNORE = -100
OVERLONG_POLICIES = ("drop", "truncate")
PREPARED_FORMAT = 2  # 2: questions and rationales stored bare (no `Problem:`/`Solution:` labels)
# What `tdg prepare` writes and every reader of prepared data expects, column by column.
SCHEMA = pa.schema([
    ("id", pa.string()), ("qid", pa.string()), ("subject", pa.string()), ("level", pa.string()),
    ("question", pa.string()), ("rationale", pa.string()), ("gold", pa.string()),
    ("pred", pa.string()),  # extracted final answer; null when the rationale has no boxed answer
    ("label", pa.string()),  # pos | neg
    ("status", pa.string()),  # graded | given | no_boxed | timeout | error
])


def target_mask(batch: dict):
    """[B, L-1] bool: positions whose next token is a target (rationale) token, i.e. labels[:, 1:] != IGNORE."""
    return batch["labels"][:, 1:] != IGNORE


def _bos(tokenizer, prompt: Prompt) -> list[int]:
    return [tokenizer.bos_token_id] if prompt.uses_bos() and tokenizer.bos_token_id is not None else []


def _prompt_texts(tokenizer, questions: Sequence[str], prompt: Prompt) -> dict[str, str]:
    """Each distinct question's prompt text, rendered once (a question has many rationales)."""
    return {q: prompt.text(tokenizer, q) for q in dict.fromkeys(questions)}


def _ids_of(tokenizer, questions: Sequence[str], prompt: Prompt, texts: dict[str, str]) -> list[list[int]]:
    ids = tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
    by_question = dict(zip(texts, ids, strict=True))
    bos = _bos(tokenizer, prompt)
    return [bos + by_question[q] for q in questions]


def prompt_ids(tokenizer, questions: Sequence[str], prompt: Prompt | str = DEFAULT_TEMPLATE) -> list[list[int]]:
    """Token ids of each question's prompt (BOS + rendered template, or the rendered chat template): what
    training and generation both feed."""
    prompt = as_prompt(prompt)
    return _ids_of(tokenizer, questions, prompt, _prompt_texts(tokenizer, questions, prompt))


def encode(tokenizer, questions: Sequence[str], rationales: Sequence[str],
           prompt: Prompt | str = DEFAULT_TEMPLATE) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, rationale ids) per sample, the rationale tokenized in context after its prompt."""
    prompt = as_prompt(prompt)
    texts = _prompt_texts(tokenizer, questions, prompt)
    prompts = _ids_of(tokenizer, questions, prompt, texts)
    whole = tokenizer([texts[q] + r for q, r in zip(questions, rationales, strict=True)],
                      add_special_tokens=False)["input_ids"]
    bos = len(_bos(tokenizer, prompt))
    targets: list[list[int]] = []
    straddling = []
    for k, (p, w) in enumerate(zip(prompts, whole, strict=True)):
        n = len(p) - bos
        if w[:n] == p[bos:]:
            targets.append(w[n:])
        else:
            targets.append([])
            straddling.append(k)
    if straddling:
        alone = tokenizer([rationales[k] for k in straddling], add_special_tokens=False)["input_ids"]
        for k, ids in zip(straddling, alone, strict=True):
            targets[k] = ids
    return prompts, targets


def read_prepared(path: str | Path, labels: tuple[str, ...] = ("pos", "neg"), columns: list[str] | None = None):
    """The prepared rows whose label is in `labels`, as a pyarrow Table in file order."""
    p = Path(path)
    shards = sorted(p.glob("data-*.parquet"))
    done = read_done(p)
    if done is None or not shards:
        raise InputError(str(p), None, "not a finished `tdg prepare` output (no DONE.json or data shards)",
                         "not_prepared")
    if done.get("stage", "prepare") != "prepare":
        raise InputError(str(p), None, f"the output of stage {done['stage']}, not of `tdg prepare`", "not_prepared")
    if done.get("metrics", {}).get("format", 1) < PREPARED_FORMAT:
        raise InputError(str(p), None, "prepared by an older version (its questions keep their `Problem:` label, "
                         "which the prompt template adds again); run `tdg prepare` again", "not_prepared")
    table = pa.concat_tables([_read_shard(shard, columns) for shard in shards])
    return table.filter(pc.is_in(table["label"], value_set=pa.array(list(labels))))


def _read_shard(path: Path, columns: list[str] | None) -> pa.Table:
    """One prepared shard, or a named error: a truncated, garbled or retyped file is not read as data."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InputError(str(path), None, f"unreadable prepared shard ({str(e).strip().splitlines()[0]}); "
                         "run `tdg prepare` again", "damaged") from None
    for name in [c for c in columns or SCHEMA.names if c in SCHEMA.names]:
        if name not in table.column_names:
            raise InputError(str(path), None, f"prepared shard has no column {name!r}; run `tdg prepare` again",
                             "damaged")
        if table.schema.field(name).type != SCHEMA.field(name).type:
            raise InputError(str(path), None, f"column {name!r} is {table.schema.field(name).type}, not "
                             f"{SCHEMA.field(name).type}; run `tdg prepare` again", "damaged")
    return table


@dataclass
class TokenizedSet:
    ids: list[str]
    input_ids: list[np.ndarray]  # prompt + target, int32
    prompt_lens: np.ndarray  # tokens of each sample that are prompt
    max_len: int = 0
    overlong_policy: str = "drop"
    overlong: Counter = field(default_factory=Counter)  # label -> samples over max_len (dropped or cut)
    prompt_too_long: int = 0  # samples whose prompt alone reaches max_len: always left out
    heldout: np.ndarray | None = None  # bool per sample: kept out of training, evaluated (data.heldout_fraction)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def report(self) -> dict:
        """What tokenizing kept and left out, for DONE.json and manifests."""
        return {"samples": len(self), "tokens": int(self.lengths.sum()), "max_len": self.max_len,
                "overlong_policy": self.overlong_policy, "overlong": dict(sorted(self.overlong.items())),
                "prompt_too_long": self.prompt_too_long}

    def describe(self) -> str:
        """What tokenizing did to the data, for the job log: nothing is dropped or cut silently."""
        total = len(self) + self.prompt_too_long + (sum(self.overlong.values()) if self.overlong_policy == "drop"
                                                     else 0)
        n_over = sum(self.overlong.values())
        per_label = ", ".join(f"{n} {label}" for label, n in sorted(self.overlong.items())) or "0"
        verb = "dropped" if self.overlong_policy == "drop" else "cut (no EOS)"
        return (f"{len(self)} samples, {int(self.lengths.sum()):,} tokens; {per_label} "
                f"({100 * n_over / max(total, 1):.1f}%) over data.max_len={self.max_len} {verb} "
                f"(data.overlong={self.overlong_policy}), {self.prompt_too_long} left out (the prompt alone "
                "reaches it)")


def tokenize(table, tokenizer, max_len: int, prompt: Prompt | str = DEFAULT_TEMPLATE, overlong: str = "drop",
             finished: Sequence[bool] | None = None) -> TokenizedSet:
    """Tokenize rows (id, question, rationale[, label]) into samples of at most `max_len` tokens.

    `finished[i]` False leaves EOS off sample i: an eval candidate that hit its token limit did not end."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    questions = table.column("question").to_pylist()
    row_ids = table.column("id").to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else ["all"] * len(row_ids)
    eos = tokenizer.eos_token_id
    prompts, targets = encode(tokenizer, questions, table.column("rationale").to_pylist(), prompt)
    data = TokenizedSet([], [], np.zeros(0, dtype=np.int64), max_len, overlong)
    plens = []
    for k, (rid, prompt, r, label) in enumerate(zip(row_ids, prompts, targets, labels, strict=True)):
        if len(prompt) >= max_len:
            data.prompt_too_long += 1
            continue
        seq = prompt + r + ([eos] if finished is None or finished[k] else [])
        if len(seq) > max_len:
            data.overlong[label] += 1
            if overlong == "drop":
                continue
            seq = seq[:max_len]
        data.ids.append(rid)
        data.input_ids.append(np.asarray(seq, dtype=np.int32))
        plens.append(len(prompt))
    data.prompt_lens = np.asarray(plens, dtype=np.int64)
    return data


def tokenize_with(table, tokenizer, data) -> TokenizedSet:
    """`tokenize` with a stage's `data` settings (max_len, prompt, overlong): one call for every stage."""
    return tokenize(table, tokenizer, data.max_len, Prompt.of(data), data.overlong)


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
