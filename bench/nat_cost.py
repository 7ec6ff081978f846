"""NAT cost: step time of stage nat (pos LoRA + gate over the frozen neg LoRA) vs plain LoRA (stage neg).

Same process, same engine, same data, batches and LoRA targets, one rank, ZeRO-2. The NAT layer
runs the neg branch, the pos branch and the gate on top of every adapted linear layer, so some
cost over plain LoRA is inherent; the goal (issue 8) is >= 0.9x on GPU, where the base matmuls
dominate. On the CPU demo model (width 64) the adapters are a large share of the work, so that
ratio is a pessimistic bound. `--width W` instead builds a random-init Llama of width W with
LLaMA-7B's proportions (MLP 2.6875 W, heads of 64, gate_dim W/32 as 128 is to 4096) on the demo's
tokenizer and data, to see how the ratio moves as the base matmuls grow.
Usage: python bench/nat_cost.py [--demo demo_out] [--steps 40] [--width W]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS,
    alternate,
    demo_bench_args,
    demo_outputs,
    demo_stage_overrides,
    record,
    run_stage_in_process,
    spread,
    stage_timer,
)


def wide_model(demo: Path, width: int, out: Path) -> tuple[Path, int]:
    """A random-init Llama of `width` with LLaMA-7B's proportions; and the gate width that matches them."""
    from train.models.loading import build_tiny_model

    spec = {**json.loads((CONFIGS / "model.json").read_text()), "hidden_size": width,
            "intermediate_size": width * 43 // 16, "num_attention_heads": width // 64,
            "num_key_value_heads": width // 64}
    return build_tiny_model(spec, demo / "pretrain" / "model", out), max(1, width // 32)


def main() -> None:
    args = demo_bench_args(__doc__, steps=40, extra=lambda ap: ap.add_argument(
        "--width", type=int, default=0, help="a random-init model of this width (a multiple of 64) instead of "
                                              "the demo's"))
    demo = demo_outputs(args.demo)
    with tempfile.TemporaryDirectory() as tmp:
        common = demo_stage_overrides(demo, args.steps, "sft.labels=[pos]")
        gate, neg, what = [], demo / "neg", "tiny model (demo)"
        if args.width:
            model, gate_dim = wide_model(demo, args.width, Path(tmp) / "model")
            common = [f"model.path={model}", *common[1:]]
            gate, neg = [f"nat.gate_dim={gate_dim}"], Path(tmp) / "neg"
            run_stage_in_process("neg", "neg", [*common[:-1], "optim.max_steps=1", f"engine.output_dir={neg}"])
            what = f"random-init Llama width {args.width} (2 layers, 7B proportions, gate_dim {gate_dim})"
        times = alternate({"lora": stage_timer("sft", "neg", common, f"{tmp}/lora"),
                           "nat": stage_timer("nat", "nat", [*common[:-1], f"nat.neg_adapter={neg}", *gate],
                                              f"{tmp}/nat")}, args.repeats)
    t_lora, t_nat = statistics.median(times["lora"]), statistics.median(times["nat"])
    record(f"NAT vs LoRA step time, {what}, {args.steps} steps, 1 rank ZeRO-2",
           f"LoRA {t_lora * 1000:.1f} ms/step (runs {spread(times['lora'])})",
           f"NAT {t_nat * 1000:.1f} ms/step (runs {spread(times['nat'])})",
           f"{t_lora / t_nat:.2f}x (median of {args.repeats} alternating runs)",
           ">= 0.9x on GPU: not measured (no GPU lent)")


if __name__ == "__main__":
    main()
