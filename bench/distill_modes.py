"""Distill step time: precomputed teacher scores (offline) vs the teacher run in every step (online).

Same process, same data, same batches (the engine's batch order depends only on the data seed),
same student; the only difference is where the KD targets come from. Online runs the NAT teacher
twice per batch (modes nat and neg, as the reference did) and takes KD over the full vocabulary;
offline reads the stored top-k. The metric is the median optimizer-step time (first step excluded),
median over alternating runs. By matmul count the ratio is at most about 2x for a LoRA student of
the teacher's size (docs/performance.md).
Usage: python bench/distill_modes.py [--demo demo_out] [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    alternate,
    demo_bench_args,
    demo_outputs,
    demo_stage_overrides,
    record,
    spread,
    stage_timer,
)


def main() -> None:
    args = demo_bench_args(__doc__, steps=30)
    demo = demo_outputs(args.demo)
    common = demo_stage_overrides(demo, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        times = alternate({
            "online": stage_timer("distill", "distill", [*common, "distill.mode=online",
                                                         f"distill.nat_dir={demo / 'nat'}"], f"{tmp}/online"),
            "offline": stage_timer("distill", "distill", [*common, f"distill.scores={demo / 'score'}"],
                                   f"{tmp}/offline")}, args.repeats)
    t_on, t_off = statistics.median(times["online"]), statistics.median(times["offline"])
    record(f"distill step time, tiny model (demo), {args.steps} steps, 1 rank ZeRO-2",
           f"online teacher {t_on * 1000:.0f} ms/step (runs {spread(times['online'])})",
           f"stored top-32 {t_off * 1000:.0f} ms/step (runs {spread(times['offline'])})",
           f"{t_on / t_off:.2f}x (median of {args.repeats} alternating runs)",
           ">= 2x on GPU: not measured (no GPU lent)")

if __name__ == "__main__":
    main()
