"""Engine overhead: steps/s of our loop (stage sft, LoRA) vs a bare `deepspeed.initialize` loop.

Same process, same tiny model and LoRA, same batches (the engine's own batcher and collate), same
DeepSpeed config (ZeRO-2, fp32 on CPU), one rank. The bare loop is forward, loss, backward, step and
nothing else: no TensorBoard, no progress bar, no per-step all-reduce of the loss terms, no stop
check. The metric is the median step time (first step excluded). Goal (issue 8): >= 0.95x.
Usage: python bench/engine_overhead.py [--demo demo_out] [--steps 40]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS,
    alternate,
    demo_bench_args,
    demo_outputs,
    demo_stage_overrides,
    record,
    spread,
    stage_timer,
)


def bare_loop(overrides: list[str], steps: int) -> float:
    """Median step seconds of the plainest DeepSpeed loop over the engine's first `steps` batches."""
    import deepspeed
    import torch

    from train.config import SftConfig, load_config
    from train.data.batching import TokenBudgetBatcher
    from train.data.dataset import collate, target_mask
    from train.engine import distributed as dist_
    from train.engine.ds_config import build_ds_config
    from train.stages.common import causal_lm_loss, load_stage_data
    from train.stages.sft import lora_model

    cfg = load_config(SftConfig, CONFIGS / "pretrain.yaml", [*overrides, "sft.full=false"])
    dist_.setup()
    ds_cfg = build_ds_config(cfg.engine.ds_config, cfg.optim, 1, bf16=False)
    data, tok = load_stage_data(cfg, labels=("pos",))
    model, _ = lora_model(cfg, ds_cfg, "bare")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_cfg,
                                      optimizer=torch.optim.AdamW(trainable, lr=cfg.optim.lr))
    engine.train()  # as the engine does (from_pretrained leaves models in eval mode)
    batches = TokenBudgetBatcher(data.lengths, cfg.data.max_tokens, seed=cfg.data.seed,
                                 group_size=cfg.data.group_size).batches(0)[:steps]
    times = []
    for b in batches:
        t0 = time.time()
        batch = collate(data, b, tok.pad_token_id, False)
        loss, _ = causal_lm_loss(engine, batch)
        n = int(target_mask(batch).sum())
        engine.backward(loss / n)
        engine.step()
        times.append(time.time() - t0)
    return statistics.median(times[1:])


def main() -> None:
    args = demo_bench_args(__doc__, steps=40)
    demo = demo_outputs(args.demo)
    common = demo_stage_overrides(demo, args.steps, "lora.dropout=0.0")
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(1000))
        times = alternate({
            "bare": lambda: bare_loop([*common, f"engine.output_dir={tmp}/b{next(runs)}"], args.steps),
            "ours": stage_timer("sft", "pretrain", [*common, "sft.full=false"], f"{tmp}/ours")}, args.repeats)
    bare, ours = times["bare"], times["ours"]
    runs_text = f"runs {spread(bare)} vs {spread(ours)} ms"
    base, ours = statistics.median(bare), statistics.median(ours)
    verdict = "met" if base / ours >= 0.95 else "missed"
    record(f"engine overhead: LoRA SFT step, tiny model (demo), {args.steps} steps, 1 rank ZeRO-2, train mode",
           f"bare deepspeed loop {base * 1000:.1f} ms/step", f"tdg engine {ours * 1000:.1f} ms/step ({runs_text})",
           f"{base / ours:.2f}x (median of {args.repeats} alternating runs)", f">= 0.95x: {verdict}")


if __name__ == "__main__":
    main()
