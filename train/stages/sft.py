"""Stage `sft`: causal-LM fine-tuning on chosen rationales, as a LoRA adapter or a full model.

Stage `neg` is this with labels = [neg] and LoRA. With `sft.full`, every parameter trains and
the result is a Hugging Face model dir (`model/`) that later stages can use as a base; the demo
pre-trains its tiny base this way. With `sft.labels=[pos]` it is the usual distillation baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import SftConfig, TrainStageConfig
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.models.adapters import AdapterSaveError, expected_lora_shapes, save_adapter
from train.models.loading import check_target_modules, load_base_model
from train.stages.common import causal_lm_loss, load_stage_data, run_stage


def peft_lora_config(cfg: TrainStageConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=str(Path(cfg.model.path).resolve()))


def build_lora(cfg: TrainStageConfig, ds_cfg: dict, labels: tuple[str, ...], name: str) -> TrainTask:
    """A PEFT LoRA adapter named `name`, trained on rationales with `labels`; saved to `adapter/`."""
    from peft import get_peft_model, get_peft_model_state_dict

    data, tok = load_stage_data(cfg, labels=labels)
    base = load_base_model(cfg.model, on_cpu=dist_.on_cpu(), ds_config=ds_cfg)
    check_target_modules(base, cfg.lora.target_modules)
    expected = expected_lora_shapes(base, cfg.lora.target_modules, cfg.lora.r)
    torch.manual_seed(cfg.engine.seed)  # the same LoRA init on every rank
    model = get_peft_model(base, peft_lora_config(cfg), adapter_name=name)

    def save(module: torch.nn.Module, out: Path) -> dict:
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        state = get_peft_model_state_dict(module, state_dict=trainable, adapter_name=name)
        save_adapter(state, module.peft_config[name], out / "adapter", expected)
        return {"adapter": str(out / "adapter"), "samples": len(data)}

    return TrainTask(name=name, model=model, data=data, loss_fn=causal_lm_loss, save_fn=save,
                     pad_id=tok.pad_token_id)


def build_full(cfg: TrainStageConfig, ds_cfg: dict, labels: tuple[str, ...], name: str) -> TrainTask:
    """Every parameter trains; saved as a Hugging Face model dir `model/` with the tokenizer."""
    data, tok = load_stage_data(cfg, labels=labels)
    model = load_base_model(cfg.model, on_cpu=dist_.on_cpu(), ds_config=ds_cfg)
    model.requires_grad_(True)
    shapes = {n: tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in model.named_parameters()}

    def save(module: torch.nn.Module, out: Path) -> dict:
        state = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        bad = [n for n, t in state.items() if tuple(t.shape) != shapes[n] or t.numel() == 0]
        if bad:
            raise AdapterSaveError(f"{out / 'model'}: parameters not gathered before saving (e.g. {bad[0]})")
        module.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
        tok.save_pretrained(out / "model")
        return {"model": str(out / "model"), "samples": len(data)}

    return TrainTask(name=name, model=model, data=data, loss_fn=causal_lm_loss, save_fn=save,
                     pad_id=tok.pad_token_id)


def build(cfg: SftConfig, ds_cfg: dict) -> TrainTask:
    labels = tuple(cfg.sft.labels)
    return (build_full if cfg.sft.full else build_lora)(cfg, ds_cfg, labels, "sft")


def main(cfg: SftConfig) -> int:
    return run_stage("sft", cfg, build)
