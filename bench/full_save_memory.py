"""Peak CPU memory per rank while a bf16 full fine-tune under ZeRO-3 writes its final model dir.

Issue 26: the save first gathered every fp32 master on every rank (~27 GB per rank for 7B), then took
DeepSpeed's 16-bit consolidation (`_zero3_consolidated_16bit_state_dict`, behind `save_16bit_model`): the
whole model in 16 bits on rank 0's CPU. It now streams (`train.engine.streamed_save`): one parameter gathered
at a time, rank 0 writing a shard whenever it reaches the shard size, so rank 0 holds at most a shard.

Each way runs in fresh processes on an engine trained one step (2 ranks, DeepSpeed on CPU, a Llama of 24 layers
and 84 M parameters, so the bf16 model, 160 MiB, spans ten 16 MiB shards); a sampling thread records each
rank's peak RSS above its level when the save starts. On the CPU accelerator DeepSpeed's consolidation costs
little: its `param.detach().cpu()` is a reference to a parameter already in host memory. On a GPU that
`.cpu()` is a copy, and rank 0 holds the whole model; the streamed save's bound is the same on both.

    python bench/full_save_memory.py            # launches itself on 2 ranks with torchrun
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20
SHARD = 16 * MIB


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

    from train.engine import distributed
    from train.engine.streamed_save import save_model_streamed

    distributed.setup()
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = LlamaForCausalLM(config)
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    ids = torch.randint(0, 8000, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    params = sum(p.ds_numel for p in engine.module.parameters())
    out, way = Path(os.environ["TDG_FULL_SAVE_DIR"]), os.environ["TDG_FULL_SAVE_WORKER"]
    with PeakRss() as peak:
        if way == "streamed":
            save_model_streamed(engine.module, out / way, shard_bytes=SHARD)
        else:  # the 16-bit consolidation it replaces, written whole by rank 0
            state = engine._zero3_consolidated_16bit_state_dict()
            if distributed.is_main():
                engine.module.save_pretrained(out / way, state_dict=state, safe_serialization=True)
            del state
    rows = distributed.all_gather_object({"rank": distributed.rank(), "mib": peak.above})
    if distributed.is_main():
        print("RESULT " + json.dumps({"params": params, "ranks": rows}), flush=True)


def main() -> None:
    import tempfile

    from bench.common import record
    from train.engine.distributed import free_port

    tmp = tempfile.mkdtemp(prefix="tdg-full-save-")
    measured = {}
    for way in ("consolidated", "streamed"):  # each in fresh processes: freed memory stays in a process's RSS
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TDG_FULL_SAVE_WORKER": way, "TDG_FULL_SAVE_DIR": tmp}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__], env=env,
                             capture_output=True, text=True, timeout=1200)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            shutil.rmtree(tmp, ignore_errors=True)
            sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
        measured[way] = json.loads(line[len("RESULT "):])
    shutil.rmtree(tmp, ignore_errors=True)
    params = measured["streamed"]["params"]
    old, new = ({r["rank"]: r["mib"] for r in measured[w]["ranks"]} for w in ("consolidated", "streamed"))
    bf16, fp32 = 2 * params / MIB, 4 * params / MIB
    print(f"{params / 1e6:.1f} M parameters (bf16 {bf16:.0f} MiB, fp32 {fp32:.0f} MiB); peak RSS above the "
          "save's start, consolidated -> streamed: " + "; ".join(f"rank {r} {old[r]:.0f} -> {new[r]:.0f} MiB"
                                                                for r in sorted(old)))
    record(f"bf16 full fine-tune, ZeRO-3, 2 ranks: peak CPU memory while the final save assembles the weights "
           f"(bench/full_save_memory.py; Llama {params / 1e6:.0f} M, bf16 {bf16:.0f} MiB, fp32 {fp32:.0f} MiB)",
           "16-bit consolidation onto rank 0, then save_pretrained: " + ", ".join(
               f"rank {r} +{old[r]:.0f} MiB" for r in sorted(old)),
           f"streamed, {SHARD // MIB} MiB shards: " + ", ".join(f"rank {r} +{new[r]:.0f} MiB" for r in sorted(new)),
           f"rank 0 streamed / bf16 model: {new[0] / bf16:.2f}x",
           f"rank 0 about a shard ({SHARD // MIB} MiB), not the bf16 model ({bf16:.0f} MiB); other ranks ~0 "
           "(the consolidation's cost on CPU is references to resident parameters; on a GPU, the whole model)")


if __name__ == "__main__":
    worker() if os.environ.get("TDG_FULL_SAVE_WORKER") else main()
