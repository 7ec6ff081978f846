"""Peak CPU memory per rank while a bf16 full fine-tune under ZeRO-3 assembles its weights for the final save.

Issue 26: the save used to gather every fp32 master on every rank (`precision.fp32_masters`, then a ZeRO-3
gather of every weight on every rank), so a 7B run held ~27 GB of fp32 per rank, ~216 GB per node. It now takes
DeepSpeed's 16-bit consolidation (`precision.consolidated_weights`): one layer at a time onto rank 0.

Both ways run in the same processes on the same trained engine (2 ranks, DeepSpeed on CPU, a Llama of
~58 M parameters); a sampling thread records each rank's peak RSS above its level before the step.

    python bench/full_save_memory.py            # launches itself on 2 ranks with torchrun
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20


class PeakRss:
    """Peak resident memory of this process above its level at entry, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def above(self) -> float:
        return (self.peak - self.start) / MIB


def worker() -> None:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.engine import distributed, precision

    distributed.setup()
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = LlamaForCausalLM(config)
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    ids = torch.randint(0, 32000, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    params = sum(p.ds_numel for p in engine.module.parameters())
    named = list(engine.module.named_parameters())
    with PeakRss() as new:
        state = precision.consolidated_weights(engine)
        del state
    with PeakRss() as old:  # what the save did before: fp32 masters and a gather of every weight, on every rank
        masters = precision.fp32_masters(named)
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            pass
        del masters
    rows = distributed.all_gather_object({"rank": distributed.rank(), "new_mib": new.above, "old_mib": old.above})
    if distributed.is_main():
        print("RESULT " + json.dumps({"params": params, "ranks": rows}), flush=True)


def main() -> None:
    from bench.common import record
    from train.engine.distributed import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TDG_FULL_SAVE_WORKER": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), __file__], env=env, capture_output=True,
                         text=True, timeout=1200)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    result = json.loads(line[len("RESULT "):])
    params, ranks = result["params"], sorted(result["ranks"], key=lambda r: r["rank"])
    bf16, fp32 = 2 * params / MIB, 4 * params / MIB
    per_rank = "; ".join(f"rank {r['rank']} {r['old_mib']:.0f} -> {r['new_mib']:.0f} MiB" for r in ranks)
    print(f"{params / 1e6:.1f} M parameters (bf16 {bf16:.0f} MiB, fp32 {fp32:.0f} MiB); peak RSS above the "
          f"step's level, old -> new: {per_rank}")
    old_total, new_total = sum(r["old_mib"] for r in ranks), sum(r["new_mib"] for r in ranks)
    record(f"bf16 full fine-tune, ZeRO-3, 2 ranks: peak CPU memory while the final save assembles the weights "
           f"(bench/full_save_memory.py; Llama {params / 1e6:.0f} M, bf16 {bf16:.0f} MiB, fp32 {fp32:.0f} MiB)",
           "fp32 masters gathered on every rank: " + ", ".join(f"rank {r['rank']} +{r['old_mib']:.0f} MiB"
                                                              for r in ranks),
           "16-bit consolidation onto rank 0: " + ", ".join(f"rank {r['rank']} +{r['new_mib']:.0f} MiB"
                                                            for r in ranks),
           f"{new_total / max(old_total, 1e-9):.2f}x (both ranks)",
           "rank 0 <= the bf16 model, other ranks ~0")


if __name__ == "__main__":
    worker() if os.environ.get("TDG_FULL_SAVE_WORKER") else main()
