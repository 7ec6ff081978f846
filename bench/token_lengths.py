"""Sample lengths of the GPT-3.5 MATH rationales under a real 32k Llama-family tokenizer, and what they
mean for data.max_len and for the reference's batch sizes in tokens.

A sample is what every stage trains on: BOS + the default prompt template + rationale + EOS. The
tokenizer is Mistral-7B's 32,000-piece sentencepiece BPE (shipped in the `mistral-common` package,
a test dependency), the same family and size as LLaMA's. Records one row per label (positives,
negatives) with quantiles and the share each max_len keeps, and one row per label with the mean
samples a length-grouped micro-batch of --max-tokens holds at --max-len (the conversion behind
the global_batch_tokens in configs/llama7b).
Usage: python bench/token_lengths.py [--prepared DIR] [--max-len 1024] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, record  # noqa: E402

from train.data.batching import TokenBudgetBatcher  # noqa: E402
from train.data.dataset import read_prepared, tokenize  # noqa: E402
from train.data.prepare import MAX_LEN_CHOICES, PrepareOptions, length_summary, prepare  # noqa: E402
from train.data.tokenizer import tokenizer_from_sentencepiece  # noqa: E402


def mistral_tokenizer(out: Path):
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        sys.exit("needs the mistral-common package (bash scripts/setup.sh dev)")
    return tokenizer_from_sentencepiece(Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepared", help="output of `tdg prepare` on the GPT-3.5 data (prepared here if not given)")
    ap.add_argument("--max-len", type=int, default=1024, help="max_len for the micro-batch fill rows")
    ap.add_argument("--max-tokens", type=int, default=4096, help="micro-batch token budget for the fill rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = mistral_tokenizer(Path(tmp) / "tok")
        prepared = args.prepared
        if prepared is None:
            prepared = str(Path(tmp) / "prepared")
            prepare(PrepareOptions(inputs=[str(SHARED_DATA)], output=prepared, workers=2, show_progress=False))
        table = read_prepared(prepared)
        data = tokenize(table, tok, max_len=1 << 30)
    labels = np.array(table.column("label").to_pylist())
    lengths = data.lengths
    name = "sample tokens (BOS + prompt + rationale + EOS), GPT-3.5 MATH rationales, Mistral-7B 32k tokenizer"
    for label in ("pos", "neg"):
        lens = lengths[labels == label]
        s = length_summary(lens, tokens=True)
        keep_98 = int(np.percentile(lens, 98))
        record(f"{name}, {label} ({len(lens):,})",
               f"mean {s['mean']:.0f}, p50 {s['p50']}, p90 {s['p90']}, p95 {s['p95']}, p98 {s['p98']}, "
               f"p99 {s['p99']}, max {s['max']}",
               "kept at max_len " + ", ".join(f"{m}: {100 * s['keeps'][str(m)]:.1f}%" for m in MAX_LEN_CHOICES),
               "-", f"max_len keeping 98%: {keep_98}")
    for label in ("pos", "neg"):
        lens = lengths[labels == label]
        lens = lens[lens <= args.max_len]
        batches = TokenBudgetBatcher(lens, args.max_tokens, seed=0).batches(0)
        per_batch = len(lens) / len(batches)
        fill = lens.sum() / (len(batches) * args.max_tokens)
        record(f"length-grouped micro-batches, GPT-3.5 {label} at max_len {args.max_len}, "
               f"{args.max_tokens} tokens per micro-batch, Mistral-7B 32k tokenizer",
               f"{len(lens):,} samples in {len(batches):,} micro-batches",
               f"{per_batch:.2f} samples per micro-batch, {100 * fill:.0f}% of the budget real tokens",
               f"128 samples = {128 / per_batch:.1f} micro-batches", "-")


if __name__ == "__main__":
    main()
