"""Pad fraction on the prepared GPT-3.5 data: length-grouped and packed vs global-max padding.

Token lengths come from a 32k-piece sentencepiece BPE trained here on the same rationales (no
hub tokenizer is reachable offline; LLaMA's is also a 32k sentencepiece BPE, so lengths are
comparable). Samples longer than `--max-len` are dropped, as the training stages do by default.
Goal (issue 8): packing <= 5% pad.
Usage: python bench/padding.py --prepared DIR [--max-len 1024] [--max-tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from train.data.batching import TokenBudgetBatcher, global_max_pad_fraction, pad_fraction  # noqa: E402
from train.data.dataset import read_prepared, tokenize  # noqa: E402
from train.data.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", required=True, help="output of `tdg prepare` on the GPT-3.5 data")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8192)
    args = ap.parse_args()
    table = read_prepared(args.prepared, labels=("pos",))
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        sample = rng.choice(table.num_rows, size=min(20000, table.num_rows), replace=False)
        texts = [table.column("question")[int(i)].as_py() + "\n" + table.column("rationale")[int(i)].as_py()
                 for i in sample]
        tok = train_tokenizer(texts, tmp, vocab_size=32000)
        lengths = tokenize(table, tok, args.max_len).lengths
    print(f"{len(lengths)} positive samples, mean {lengths.mean():.0f} tokens, max {lengths.max()}")
    base = global_max_pad_fraction(lengths)
    grouped = pad_fraction(TokenBudgetBatcher(lengths, args.max_tokens).batches(0), lengths, packing=False)
    packed = pad_fraction(TokenBudgetBatcher(lengths, args.max_tokens, packing=True).batches(0), lengths, True)
    name = f"pad fraction, GPT-3.5 positives, cutoff {args.max_len}, {args.max_tokens} tokens/batch"
    record(name + " (length-grouped)", f"global max {base:.1%}", f"{grouped:.1%}",
           f"{(1 - grouped) / (1 - base):.2f}x useful tokens", "-")
    record(name + " (packing)", f"global max {base:.1%}", f"{packed:.1%}",
           f"{(1 - packed) / (1 - base):.2f}x useful tokens", "<= 5%: " + ("met" if packed <= 0.05 else "missed"))


if __name__ == "__main__":
    main()
