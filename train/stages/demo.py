"""`tdg demo`: the whole pipeline on the embedded default data, on CPU, in minutes.

Steps (each skipped when its output is already complete, so a rerun resumes):
  1. synthetic data (train + held-out test) in the TDG layout   -> OUT/raw
  2. a sentencepiece tokenizer trained on the train text         -> OUT/tokenizer
  3. prepare: grade every rationale, write the prepared data set -> OUT/prepared
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from train.data.prepare import PrepareOptions, format_stats, prepare
from train.data.synthetic import generate
from train.data.tokenizer import train_tokenizer
from train.manifest import read_done, write_done


@dataclass
class DemoOptions:
    output: str = "demo_out"
    questions: int = 600
    test_questions: int = 150
    seed: int = 0
    workers: int = 2
    vocab_size: int = 512


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _raw_texts(raw_train: Path):
    for f in sorted(raw_train.rglob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            yield rec["question"]
            yield rec["answer"]
            yield from rec["generated_answer"]


def run_demo(opts: DemoOptions) -> dict:
    out = Path(opts.output)
    raw = out / "raw"
    if read_done(raw) is None:
        _log(f"generating {opts.questions} train + {opts.test_questions} test questions -> {raw}")
        generate(raw, n_train=opts.questions, n_test=opts.test_questions, seed=opts.seed)
        write_done(raw, config=vars(opts), inputs={}, metrics={})
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        _log(f"training a {opts.vocab_size}-piece sentencepiece tokenizer -> {tok_dir}")
        train_tokenizer(_raw_texts(raw / "train"), tok_dir, vocab_size=opts.vocab_size)
    prepared = out / "prepared"
    _log(f"prepare -> {prepared}")
    stats = prepare(PrepareOptions(inputs=[str(raw / "train")], output=str(prepared), workers=opts.workers,
                                   tokenizer=str(tok_dir)))
    print(format_stats(stats))
    _log(f"done: {out}")
    return stats
