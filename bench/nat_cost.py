"""NAT cost: step time of stage nat (pos LoRA + gate over the frozen neg LoRA) vs plain LoRA (stage neg).

Same process, same engine, same data, batches and LoRA targets, one rank, ZeRO-2. The NAT layer
runs the neg branch, the pos branch and the gate on top of every adapted linear layer, so some
cost over plain LoRA is inherent; the goal (issue 8) is >= 0.9x on GPU, where the base matmuls
dominate. On the CPU demo model (width 64) the adapters are a large share of the work, so this
ratio is a pessimistic bound.
Usage: python bench/nat_cost.py [--demo demo_out] [--steps 40]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, demo_bench_args, demo_outputs, demo_stage_overrides, record, run_stage_in_process, spread  # noqa: E402


def main() -> None:
    args = demo_bench_args(__doc__, steps=40)
    demo = demo_outputs(args.demo)
    common = demo_stage_overrides(demo, args.steps, "sft.labels=[pos]")
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(1000))
        times = alternate({
            "lora": lambda: run_stage_in_process("sft", "neg", [*common, f"engine.output_dir={tmp}/l{next(runs)}"])
            ["step_seconds_median"],
            "nat": lambda: run_stage_in_process("nat", "nat", [*common[:-1], f"nat.neg_adapter={demo / 'neg'}",
                                                               f"engine.output_dir={tmp}/n{next(runs)}"])
            ["step_seconds_median"]}, args.repeats)
    t_lora, t_nat = statistics.median(times["lora"]), statistics.median(times["nat"])
    record(f"NAT vs LoRA step time, tiny model (demo), {args.steps} steps, 1 rank ZeRO-2",
           f"LoRA {t_lora * 1000:.1f} ms/step (runs {spread(times['lora'])})",
           f"NAT {t_nat * 1000:.1f} ms/step (runs {spread(times['nat'])})",
           f"{t_lora / t_nat:.2f}x (median of {args.repeats} alternating runs)",
           ">= 0.9x on GPU: not measured (no GPU lent)")


if __name__ == "__main__":
    main()
