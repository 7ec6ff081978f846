"""Stage `neg`: the negative teacher, a PEFT LoRA adapter trained on NEGATIVE rationales only.

Output: `<output_dir>/adapter/` (loads with `peft.PeftModel.from_pretrained(base, dir)`),
config.yaml, tb/, checkpoints/, DONE.json.
"""

from __future__ import annotations

from train.config import NegConfig
from train.engine.loop import TrainTask
from train.stages.common import run_stage
from train.stages.sft import build_sft


def build(cfg: NegConfig, ds_cfg: dict) -> TrainTask:
    return build_sft(cfg, ds_cfg, labels=("neg",), name="neg", full=False)


def main(cfg: NegConfig) -> int:
    return run_stage("neg", cfg, build)
