"""Peak memory of one distill rank reading the teacher's stored top-k: every shard read whole and widened
(the loader before issue 16: int64 ids, fp32 log-probs in RAM) vs memory-mapped shards read per batch.

A synthetic `score` output of --samples rationales x --tokens tokens x top-k --k is written once (the
shard format stage score writes: int16 ids for a 32k vocabulary, fp16 log-probs). Each loader then runs
in a fresh process that builds its index and assembles every batch of one epoch (--batch samples each),
as distill's collate does; the process reports its peak resident set (VmHWM) and its peak anonymous
memory (RssAnon, sampled each batch: memory the rank owns, where mapped file pages are page cache that
the ranks of a node share and the kernel can drop).
Usage: python bench/distill_memory.py [--samples 60000] [--tokens 400] [--k 32] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

SHARD_SAMPLES = 1024


def write_scores(out: Path, samples: int, tokens: int, k: int, vocab: int = 32000) -> None:
    import torch
    from safetensors.torch import save_file

    from train.manifest import file_digest, write_done

    (out / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for n, start in enumerate(range(0, samples, SHARD_SAMPLES)):
        ids = [f"s{i}" for i in range(start, min(start + SHARD_SAMPLES, samples))]
        rows = len(ids) * tokens
        lp = np.sort(rng.standard_normal((rows, k), dtype=np.float32) - 6, axis=1)[:, ::-1]
        tensors = {"offsets": torch.arange(0, rows + 1, tokens, dtype=torch.int64),
                   "beta": torch.from_numpy(rng.random(len(ids), dtype=np.float32)),
                   "kl_mean": torch.zeros(len(ids)),
                   "topk_ids": torch.from_numpy(rng.integers(0, vocab, (rows, k), dtype=np.int16)),
                   "topk_logprobs": torch.from_numpy(np.ascontiguousarray(lp)).half(),
                   "tail_logprob": torch.full((rows,), -3.0)}
        path = out / "shards" / f"shard-{n:05d}.safetensors"
        save_file(tensors, str(path), metadata={"ids": json.dumps(ids), "top_k": str(k), "format": "tdg-scores-1"})
        shards.append({"file": path.relative_to(out).as_posix(), "samples": len(ids), "sha256": file_digest(path)})
    (out / "manifest.json").write_text(json.dumps({"samples": samples, "shards": shards, "top_k": k, "max_len": 0}))
    write_done(out, config={}, inputs={}, metrics={}, stage="score")


MEASURE = r"""
import json, sys, numpy as np, torch
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

mode, scores_dir, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
peak_anon = 0
if mode == "whole":  # the loader before: every shard read whole, ids widened to int64, log-probs to fp32
    from safetensors import safe_open
    manifest = json.loads((scores_dir / "manifest.json").read_text())
    where, ids_, lps, tails = {}, [], [], []
    for k, shard in enumerate(manifest["shards"]):
        with safe_open(str(scores_dir / shard["file"]), framework="pt") as f:
            sids = json.loads(f.metadata()["ids"])
            offsets = f.get_tensor("offsets").numpy()
            ids_.append(f.get_tensor("topk_ids").long().numpy())
            lps.append(f.get_tensor("topk_logprobs").float().numpy())
            tails.append(f.get_tensor("tail_logprob").float().numpy())
        for s, sid in enumerate(sids):
            where[sid] = (k, int(offsets[s]), int(offsets[s + 1]))
        peak_anon = max(peak_anon, status("RssAnon"))

    def targets(sample_ids):
        rows = [where[s] for s in sample_ids]
        return {"kd_ids": torch.from_numpy(np.concatenate([ids_[k][a:b] for k, a, b in rows])),
                "kd_lp": torch.from_numpy(np.concatenate([lps[k][a:b] for k, a, b in rows])),
                "kd_tail": torch.from_numpy(np.concatenate([tails[k][a:b] for k, a, b in rows]))}
else:
    from train.stages.distill import StoredScores, stored_targets
    scores = StoredScores(scores_dir)
    where = scores.where
    targets = lambda sample_ids: stored_targets(scores, sample_ids)  # noqa: E731
order = sorted(where)
tokens = 0
for start in range(0, len(order), batch):
    t = targets(order[start:start + batch])
    tokens += len(t["kd_tail"])
    peak_anon = max(peak_anon, status("RssAnon"))
print(json.dumps({"peak_rss": status("VmHWM"), "peak_anon": peak_anon, "tokens": tokens}))
"""


def measure(mode: str, scores: Path, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(scores), str(batch)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--tokens", type=int, default=400, help="scored tokens per sample")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=10, help="samples per micro-batch")
    ap.add_argument("--work", help="keep the synthetic scores here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(args.work or tmp) / "scores"
        if not (scores / "DONE.json").is_file():
            write_scores(scores, args.samples, args.tokens, args.k)
        disk = sum(f.stat().st_size for f in (scores / "shards").iterdir())
        whole, mapped = measure("whole", scores, args.batch), measure("mmap", scores, args.batch)
    assert whole["tokens"] == mapped["tokens"] == args.samples * args.tokens
    gib = 2 ** 30
    record(f"distill rank memory reading stored top-{args.k}, {args.samples:,} samples x {args.tokens} tokens "
           f"({disk / gib:.1f} GiB of shards), one epoch of {args.batch}-sample batches",
           f"shards read whole: peak RSS {whole['peak_rss'] / gib:.2f} GiB, anonymous {whole['peak_anon'] / gib:.2f}"
           " GiB",
           f"memory-mapped: peak RSS {mapped['peak_rss'] / gib:.2f} GiB (mapped pages: shared page cache), "
           f"anonymous {mapped['peak_anon'] / gib:.2f} GiB",
           f"{whole['peak_anon'] / mapped['peak_anon']:.0f}x less anonymous memory per rank",
           "flat per rank: met" if mapped["peak_anon"] < 2 * gib else "flat per rank: missed")


if __name__ == "__main__":
    main()
