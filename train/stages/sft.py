"""Stage `sft`: causal-LM fine-tuning on chosen rationales, as a LoRA adapter or a full model.

Stage `neg` is this with labels = [neg] and LoRA. With `sft.full`, every parameter trains and
the result is a Hugging Face model dir (`model/`) that later stages can use as a base; the demo
pre-trains its tiny base this way. With `sft.labels=[pos]` it is the usual distillation baseline.

With `sft.unlikelihood = w > 0` (labels [pos, neg]) it is the unlikelihood baseline the paper
compares against (Welleck et al. 2020, token level): positive tokens get cross-entropy, negative
tokens get w * -log(1 - p(token)), pushing probability away from what the negative rationale says.
Both are summed over tokens and averaged over all target tokens of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from train.config import SftConfig, TrainStageConfig
from train.engine.loop import TrainTask
from train.models.adapters import expected_lora_shapes, save_adapter
from train.models.loading import check_target_modules, load_base_model
from train.stages.common import (
    causal_lm_loss,
    collate_with_values,
    is_negative,
    load_stage_data,
    model_dtype,
    run_stage,
    token_logprobs,
)


def peft_lora_config(cfg: TrainStageConfig, task_type: str | None = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type=task_type,
                      base_model_name_or_path=str(Path(cfg.model.path).resolve()))


SaveFn = Callable[[torch.nn.Module, Path], dict]


def lora_model(cfg: TrainStageConfig, ds_cfg: dict, name: str) -> tuple[torch.nn.Module, SaveFn]:
    """Base model + a PEFT LoRA adapter `name`; the save writes a verified PEFT dir `adapter/`."""
    from peft import get_peft_model, get_peft_model_state_dict

    base = load_base_model(cfg.model, model_dtype(cfg), ds_config=ds_cfg)
    check_target_modules(base, cfg.lora.target_modules)
    expected = expected_lora_shapes(base, cfg.lora.target_modules, cfg.lora.r)
    torch.manual_seed(cfg.engine.seed)  # the same LoRA init on every rank
    # adapters in the base's dtype (train.engine.precision): DeepSpeed keeps their fp32 masters
    model = get_peft_model(base, peft_lora_config(cfg), adapter_name=name, autocast_adapter_dtype=False)

    def save(module: torch.nn.Module, out: Path) -> dict:
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        state = get_peft_model_state_dict(module, state_dict=trainable, adapter_name=name)
        save_adapter(state, module.peft_config[name], out / "adapter", expected)
        return {"adapter": str(out / "adapter")}

    return model, save


def full_model(cfg: TrainStageConfig, ds_cfg: dict, tok) -> tuple[torch.nn.Module, SaveFn]:
    """Every parameter trains; the save writes a Hugging Face model dir `model/` with the tokenizer."""
    model = load_base_model(cfg.model, model_dtype(cfg), ds_config=ds_cfg)
    model.requires_grad_(True)

    def save(module: torch.nn.Module, out: Path, **_) -> dict:
        """The weights are already in `model/` (the loop's streamed save, every rank); the tokenizer joins them."""
        tok.save_pretrained(out / "model")
        return {"model": str(out / "model")}

    return model, save


def build_sft(cfg: TrainStageConfig, ds_cfg: dict, labels: tuple[str, ...], name: str, full: bool,
              unlikelihood: float = 0.0) -> TrainTask:
    """Causal-LM fine-tuning on rationales with `labels` (stage sft; stage neg is labels=(neg,))."""
    data, tok = load_stage_data(name, cfg, labels=labels)
    model, save = full_model(cfg, ds_cfg, tok) if full else lora_model(cfg, ds_cfg, name)
    chunk = cfg.model.loss_chunk_tokens
    loss_fn, collate_fn = (lambda module, batch: causal_lm_loss(module, batch, chunk)), None
    if unlikelihood > 0:
        collate_fn = collate_with_values(data, is_negative(cfg, data), "neg", tok.pad_token_id, cfg.data.packing,
                                         cfg.data.mask_prompt)
        loss_fn = lambda module, batch: unlikelihood_loss(module, batch, unlikelihood, chunk)  # noqa: E731
    return TrainTask(name=name, model=model, data=data, loss_fn=loss_fn, pad_id=tok.pad_token_id, full_weights=full,
                     collate_fn=collate_fn,
                     save_fn=lambda module, out, **state: {**save(module, out, **state), "samples": len(data)})


def unlikelihood_loss(module: torch.nn.Module, batch: dict, weight: float, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """Sum of CE over positive target tokens + weight * sum of -log(1 - p) over negative ones."""
    lp, mask = token_logprobs(module, batch, chunk)
    lp, neg = lp[mask], batch["neg"][:, 1:][mask]
    ce = -(lp[~neg]).sum()
    ul = -torch.log1p(-lp[neg].exp().clamp(max=1 - 1e-6)).sum()
    return ce + weight * ul, {"ce": ce.detach(), "ul": ul.detach()}


def build(cfg: SftConfig, ds_cfg: dict) -> TrainTask:
    return build_sft(cfg, ds_cfg, tuple(cfg.sft.labels), "sft", full=cfg.sft.full,
                     unlikelihood=cfg.sft.unlikelihood)


def main(cfg: SftConfig) -> int:
    return run_stage("sft", cfg, build)
