"""Stage `neg`: the negative teacher, a PEFT LoRA adapter trained on NEGATIVE rationales only.

Output: `<output_dir>/adapter/` (loads with `peft.PeftModel.from_pretrained(base, dir)`),
config.yaml, tb/, checkpoints/, DONE.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import NegConfig
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.models.adapters import expected_lora_shapes, save_adapter
from train.models.loading import check_target_modules, load_base_model
from train.stages.common import causal_lm_loss, load_stage_data, run_stage

ADAPTER_NAME = "neg"


def peft_lora_config(cfg: NegConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=str(Path(cfg.model.path).resolve()))


def build(cfg: NegConfig, ds_cfg: dict) -> TrainTask:
    from peft import get_peft_model, get_peft_model_state_dict

    data, tok = load_stage_data(cfg, labels=("neg",))
    base = load_base_model(cfg.model, on_cpu=dist_.on_cpu(), ds_config=ds_cfg)
    check_target_modules(base, cfg.lora.target_modules)
    expected = expected_lora_shapes(base, cfg.lora.target_modules, cfg.lora.r)
    torch.manual_seed(cfg.engine.seed)  # the same LoRA init on every rank
    model = get_peft_model(base, peft_lora_config(cfg), adapter_name=ADAPTER_NAME)

    def save(module: torch.nn.Module, out: Path) -> dict:
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        state = get_peft_model_state_dict(module, state_dict=trainable, adapter_name=ADAPTER_NAME)
        save_adapter(state, module.peft_config[ADAPTER_NAME], out / "adapter", expected)
        return {"adapter": str(out / "adapter"), "samples": len(data)}

    return TrainTask(name="neg", model=model, data=data, loss_fn=causal_lm_loss, save_fn=save,
                     pad_id=tok.pad_token_id)


def main(cfg: NegConfig) -> int:
    return run_stage("neg", cfg, build)
