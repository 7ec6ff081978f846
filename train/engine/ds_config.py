"""Fill a DeepSpeed JSON from the stage config, so batch sizes and precision have one source.

Keys set to "auto" are filled in; a concrete value the user wrote that disagrees with the
stage config is an error naming both values (DeepSpeed would otherwise fail later, or train
with a batch size nobody asked for).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from train.config import OptimConfig
from train.errors import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        return p
    return DS_CONFIG_DIR / f"{name_or_path}.json"


def _fill(cfg: dict, key: str, value, where: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(f"{where}: {key} is {current!r} but the stage config implies {value!r} "
                          "(set it to \"auto\" or make them agree)")


def effective_optim(optim: OptimConfig, max_tokens: int, world: int) -> OptimConfig:
    """`optim` with grad_accum derived from optim.global_batch_tokens (when set) for this world size:
    global_batch_tokens = world x grad_accum x data.max_tokens, exactly, or a ConfigError naming the numbers."""
    target = optim.global_batch_tokens
    if target <= 0:
        return optim
    per_micro_round = world * max_tokens
    accum, rest = divmod(target, per_micro_round)
    if accum < 1 or rest:
        nearest = " or ".join(f"{per_micro_round * a:,}" for a in sorted({max(1, accum), accum + 1}))
        raise ConfigError(f"optim.global_batch_tokens={target:,} cannot be met on {world} rank(s) with "
                          f"data.max_tokens={max_tokens:,}: it must be a multiple of ranks x max_tokens = "
                          f"{per_micro_round:,} (nearest: {nearest}); change one of the three")
    return dataclasses.replace(optim, grad_accum=accum)


def build_ds_config(name_or_path: str, optim: OptimConfig, world: int, bf16: bool,
                    load_universal: bool = False) -> dict:
    path = resolve_path(name_or_path)
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"engine.ds_config: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    where = str(path)
    # A micro-batch is one token-budgeted batch from our sampler; DeepSpeed only does the bookkeeping.
    _fill(cfg, "train_micro_batch_size_per_gpu", 1, where)
    _fill(cfg, "gradient_accumulation_steps", optim.grad_accum, where)
    _fill(cfg, "train_batch_size", world * optim.grad_accum, where)
    _fill(cfg, "gradient_clipping", optim.grad_clip, where)
    bf16_cfg = cfg.setdefault("bf16", {})
    if bf16_cfg.get("enabled", "auto") == "auto":
        bf16_cfg["enabled"] = bf16
    if cfg.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{where}: fp16 is not supported (it needs loss scaling); use engine.precision=bf16")
    if bf16_cfg["enabled"] != bf16:
        raise ConfigError(f"{where}: bf16.enabled is {bf16_cfg['enabled']} but engine.precision resolves to "
                          f"{'bf16' if bf16 else 'fp32'} (set it to \"auto\" and choose with engine.precision)")
    if bf16:  # bf16 parameters, fp32 gradient accumulation beside DeepSpeed's fp32 masters (train.engine.precision)
        _fill(cfg.setdefault("data_types", {}), "grad_accum_dtype", "fp32", where)
    zero = cfg.setdefault("zero_optimization", {})
    if "offload_optimizer" in zero:  # ZeRO-Offload needs DeepSpeed's CPU Adam, configured here
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                                         "weight_decay": optim.weight_decay}}
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
