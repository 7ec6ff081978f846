"""Stage `nat`: positive LoRA + attention gate over the frozen neg adapter, on POSITIVE rationales.

Output: `pos/` (PEFT adapter), `gate.safetensors`, `nat.json` (points at the base model and the
neg adapter; `train.models.nat.load_nat_teacher(dir, mode)` rebuilds the teacher), config.yaml,
tb/ (with per-layer alpha mean/std), checkpoints/, DONE.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.config import NatConfig
from train.data.prompt import Prompt, check_same_prompt
from train.engine.loop import TrainTask
from train.errors import ConfigError
from train.manifest import check_stage_output, dir_digest, read_done, trained_on_other_weights
from train.models.adapters import expected_lora_shapes
from train.models.loading import check_target_modules, load_base_model
from train.models.nat import add_nat_layers, gate_shapes, load_lora_branch, save_nat_dir
from train.stages.common import causal_lm_loss, load_stage_data, model_dtype, run_stage
from train.stages.sft import peft_lora_config


def neg_adapter_dir(cfg: NatConfig) -> Path:
    """`nat.neg_adapter` may name the neg stage's output dir or its adapter/ dir."""
    d = Path(cfg.nat.neg_adapter)
    for candidate in (d / "adapter", d):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"nat.neg_adapter: {d} holds no PEFT adapter (no adapter_config.json in it or in "
                      f"{d / 'adapter'}); run stage neg first")


def _check_matches_neg(cfg: NatConfig, neg_dir: Path) -> None:
    neg = json.loads((neg_dir / "adapter_config.json").read_text())
    mine = {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "target_modules": sorted(cfg.lora.target_modules)}
    theirs = {"r": neg["r"], "lora_alpha": neg["lora_alpha"], "target_modules": sorted(neg["target_modules"])}
    for key in mine:
        if mine[key] != theirs[key]:
            raise ConfigError(f"lora: {key} is {mine[key]!r} here but {theirs[key]!r} in the neg adapter "
                              f"{neg_dir}; both branches of a NAT layer share r, alpha and target modules")


def _check_same_base(cfg: NatConfig, neg_out: Path) -> None:
    """The neg adapter was trained on the weights at model.path (by content: its DONE.json records them). An
    adapter from another base loads without complaint into any model of the same shape, and trains garbage."""
    if trained_on_other_weights(neg_out, cfg.model.path):
        done = read_done(neg_out) or {}
        raise ConfigError(f"nat.neg_adapter: {neg_out} was trained on other base weights than model.path "
                          f"{cfg.model.path} (it records {done.get('config', {}).get('model', {}).get('path')}); "
                          "NAT's two branches must share one base: give the base the neg stage trained on")


def build(cfg: NatConfig, ds_cfg: dict) -> TrainTask:
    neg_dir = neg_adapter_dir(cfg)
    check_stage_output(neg_dir.parent if neg_dir.name == "adapter" else neg_dir, "nat.neg_adapter", ("neg", "sft"),
                       required=False)
    _check_matches_neg(cfg, neg_dir)
    _check_same_base(cfg, neg_dir.parent if neg_dir.name == "adapter" else neg_dir)
    check_same_prompt(Prompt.of(cfg.data), neg_dir.parent if neg_dir.name == "adapter" else neg_dir, "the neg stage")
    data, tok = load_stage_data("nat", cfg, labels=("pos",))
    base = load_base_model(cfg.model, model_dtype(cfg), ds_config=ds_cfg)
    check_target_modules(base, cfg.lora.target_modules)
    expected_pos = expected_lora_shapes(base, cfg.lora.target_modules, cfg.lora.r)
    torch.manual_seed(cfg.engine.seed)
    layers = add_nat_layers(base, cfg.lora.target_modules, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                            cfg.nat.gate_dim, cfg.nat.beta, cfg.nat.temperature)
    load_lora_branch(layers, neg_dir, "neg")
    base.requires_grad_(False)  # after wrapping: the new layers' parameters, neg included, default to trainable
    for layer in layers.values():
        for part in (layer.lora_A_pos, layer.lora_B_pos, layer.gate_q, layer.gate_k, layer.gate_v1, layer.gate_v2):
            part.requires_grad_(True)
    expected_gate = gate_shapes(layers)

    def save(module: torch.nn.Module, out: Path) -> dict:
        save_nat_dir(out, layers, peft_lora_config(cfg), cfg.model.path, str(neg_dir), expected_pos, expected_gate,
                     cfg.model.attn_implementation)
        return {"samples": len(data), **_alpha_summary(layers)}

    def scalars(module: torch.nn.Module) -> dict[str, float]:
        return {f"alpha/{name}/{stat}": float(v) for name, layer in layers.items() if layer.alpha_stats is not None
                for stat, v in zip(("mean", "std"), layer.alpha_stats.tolist(), strict=True)}

    return TrainTask(name="nat", model=base, data=data, save_fn=save,
                     loss_fn=lambda module, batch: causal_lm_loss(module, batch, cfg.model.loss_chunk_tokens),
                     pad_id=tok.pad_token_id, scalars_fn=scalars)


def _alpha_summary(layers) -> dict:
    means = [float(layer.alpha_stats[0]) for layer in layers.values() if layer.alpha_stats is not None]
    return {"alpha_mean": sum(means) / len(means)} if means else {}


def main(cfg: NatConfig) -> int:
    return run_stage("nat", cfg, build, extra_inputs={"neg_adapter": dir_digest(neg_adapter_dir(cfg))})
