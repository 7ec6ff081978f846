"""Scorer vs bare forward passes: samples/s of stage score against a loop that only runs the teacher.

The baseline is the least any scorer must do: for every batch the stage would run, one forward
pass in mode `nat` and one in mode `neg`, under no_grad, on the model already in memory. The
measured variant is the whole stage in this process (world of one, no ZeRO): tokenizing, model
load, the two forward passes, log-softmax, KL, top-k, the host copies, writing and verifying the
shards. Both use the demo's NAT teacher and prepared positives and run alternately; the ratio is
baseline time / stage time (goal >= 0.9 on GPU, issue 8). On the CPU demo model (width 64,
vocabulary 512) the vocabulary-wide work is a large share of the total, so this is a pessimistic bound.
Usage: python bench/score_forward.py [--demo demo_out] [--repeats 3]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, demo_bench_args, demo_outputs, record, spread, stage_timer  # noqa: E402

from train.config import DataConfig  # noqa: E402
from train.data.dataset import collate, read_prepared, tokenize_with  # noqa: E402
from train.data.tokenizer import load_tokenizer  # noqa: E402
from train.manifest import read_done  # noqa: E402
from train.models.nat import NAT_JSON, load_nat_teacher, set_mode  # noqa: E402
from train.stages.score import plan_shards  # noqa: E402


def bare_forward(score_dir: Path, device: str = "cpu"):
    """A zero-argument timer of two teacher forward passes over every batch that the finished stage-score
    run in `score_dir` made (same data, teacher, max_len, max_tokens and shard_size), and the sample count."""
    cfg = read_done(score_dir)["config"]
    nat_dir = Path(cfg["score"]["nat_dir"])
    tok = load_tokenizer(json.loads((nat_dir / NAT_JSON).read_text())["base_model"])
    data = tokenize_with(read_prepared(cfg["data"]["path"], labels=("pos",)), tok, DataConfig(**cfg["data"]))
    batches = [{k: v.to(device) for k, v in collate(data, b, tok.pad_token_id, packing=False).items()}
               for plan in plan_shards(data.lengths, cfg["score"]["shard_size"], cfg["data"]["max_tokens"])
               for b in plan]
    model = load_nat_teacher(nat_dir, "nat", device=torch.device(device))

    @torch.no_grad()
    def run() -> float:
        t0 = time.perf_counter()
        for b in batches:
            for mode in ("nat", "neg"):
                set_mode(model, mode)
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        set_mode(model, "nat")
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run, len(data.ids)


def main() -> None:
    args = demo_bench_args(__doc__, steps=None)
    demo = demo_outputs(args.demo)
    bare, samples = bare_forward(demo / "score")
    overrides = [f"data.path={demo / 'prepared'}", f"score.nat_dir={demo / 'nat'}", "engine.ds_config=none",
                 "engine.progress=false"]
    stages: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        times = alternate({"bare": bare, "stage": stage_timer("score", "score", overrides, tmp, "seconds", stages)},
                          args.repeats)
    t_bare, t_stage = statistics.median(times["bare"]), statistics.median(times["stage"])
    t_loop = statistics.median(m["rank0_scoring_seconds"] for m in stages)
    record(f"scorer vs bare teacher forward passes (nat + neg), {samples} samples, tiny NAT teacher (demo), "
           f"1 process, {torch.get_num_threads()} threads",
           f"bare forward loop {samples / t_bare:.1f} samples/s (runs {spread(times['bare'], 1, 1)} s)",
           f"stage score {samples / t_stage:.1f} samples/s (runs {spread(times['stage'], 1, 1)} s; "
           f"scoring loop alone {t_loop:.1f} s)",
           f"{t_bare / t_stage:.2f}x whole stage, {t_bare / t_loop:.2f}x scoring loop "
           f"(median of {args.repeats} alternating runs)",
           ">= 0.9x on GPU: not measured (no GPU lent)")

if __name__ == "__main__":
    main()
