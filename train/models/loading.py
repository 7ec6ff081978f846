"""Base models and tokenizers from local directories; the tiny from-scratch default.

Hub ids are resolved to cached snapshot dirs before this (`train.models.hub`); nothing is
fetched (`local_files_only`), and `trust_remote_code` stays off unless
the config asks for it. Under ZeRO-3 the model is created already partitioned (transformers'
`HfDeepSpeedConfig` hook), so a 70B teacher never sits whole in one process's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.config import ModelConfig
from train.errors import ConfigError, InputError

_DS_HOOK = None  # HfDeepSpeedConfig must stay referenced while ZeRO-3 models are built


def tokenizer_dir(mcfg: ModelConfig) -> str:
    return mcfg.tokenizer or mcfg.path


def check_model_dir(path: str, key: str = "model.path") -> Path:
    """A local Hugging Face model dir, or an error that says what `path` is instead."""
    p = Path(path)
    if (p / "config.json").is_file():
        check_weights(p, key)
        return p
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist (give a local model directory, or a hub id org/name "
                          "that is in the Hugging Face cache)")
    done = p / "DONE.json"
    if done.is_file():
        import json

        stage = json.loads(done.read_text()).get("stage", "a stage")
        hint = (f"use {p / 'model'} (its full fine-tune)" if (p / "model" / "config.json").is_file() else
                f"merge it into a model dir with `tdg export --from {p} --output DIR`")
        raise ConfigError(f"{key}: {path} is the output of {stage}, not a model directory; {hint}")
    if (p / "adapter_config.json").is_file():
        raise ConfigError(f"{key}: {path} is a PEFT adapter, not a model directory; give its base model "
                          "(adapter_config.json: base_model_name_or_path) or merge it with `tdg export`")
    raise ConfigError(f"{key}: {path} is not a local Hugging Face model directory (no config.json)")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(p: Path, key: str = "model.path") -> None:
    """The model dir's weight files are there and their safetensors headers whole (a truncated copy or a
    half-finished download), read from the headers only: a named error here instead of a loader's traceback."""
    from safetensors import safe_open

    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}: {p} has config.json but no weights (none of {', '.join(WEIGHT_FILES)})")
    files = [p / "model.safetensors"] if (p / "model.safetensors").is_file() else []
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files += [p / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(str(index), None, f"not a safetensors index ({e})", "damaged") from None
    for f in files:
        if not f.is_file():
            raise InputError(str(f), None, f"missing: {index.name} lists it", "damaged")
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
            raise InputError(str(f), None, f"damaged or truncated weights ({e}); copy or export the model again",
                             "damaged") from None


def load_base_model(mcfg: ModelConfig, dtype: torch.dtype, ds_config: dict | None = None, scalar_head: bool = False,
                    device: torch.device | None = None):
    """AutoModelForCausalLM from `mcfg.path` in `dtype` (AutoModelForSequenceClassification with one output,
    a new head, if `scalar_head`); partitioned at load time when ds_config is ZeRO-3, else loaded straight
    onto `device` when given (a 7B model never sits whole in host memory on its way to a GPU)."""
    global _DS_HOOK
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_dir(mcfg.path)
    # transformers partitions every model it builds while a HfDeepSpeedConfig is alive, so a hook left from
    # an earlier ZeRO-3 load in this process must not leak into a load that asked for whole weights
    _DS_HOOK = None
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _DS_HOOK = HfDeepSpeedConfig(ds_config)
    cls, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if scalar_head else (AutoModelForCausalLM, {})
    if device is not None and _DS_HOOK is None:
        extra["device_map"] = {"": device}
    kwargs = {**extra, "local_files_only": True, "dtype": dtype, "trust_remote_code": mcfg.trust_remote_code,
              "attn_implementation": attention(mcfg.attn_implementation)}
    model = _with_new_score_head(cls, mcfg.path, kwargs) if scalar_head else cls.from_pretrained(mcfg.path, **kwargs)
    model.config.use_cache = False
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def attention(setting: str) -> str:
    """The attention kernel for `model.attn_implementation`: auto is flash_attention_2 on a GPU where flash-attn
    is installed (the fastest, and no [L x L] matrix), else sdpa (PyTorch's fused kernels)."""
    if setting != "auto":
        return setting
    import importlib.util

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def _with_new_score_head(cls, path: str, kwargs: dict):
    """A causal LM's body under a new one-output head. transformers reports the swap (lm_head unused, score
    newly initialised) as a warning table on every load, the eval's included, where the trained head is
    loaded next; that expected report is kept quiet and anything else missing is an error."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, **kwargs, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing or info.get("mismatched_keys"):
        raise ConfigError(f"{path}: weights missing or of the wrong shape under a score head: "
                          f"{', '.join(missing[:5] or [str(k) for k in info['mismatched_keys'][:5]])}")
    return model


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Leaf names (e.g. q_proj) of the Linear layers LoRA can target (the lm head excluded)."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not in the model; "
                          f"its linear layers are: {', '.join(sorted(available))}")


def build_tiny_model(config_json: str | Path | dict, tokenizer: str | Path, out_dir: str | Path, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str = "cpu", vocab_size: int | None = None) -> Path:
    """Write a randomly initialised Llama (sizes from `config_json`, a file or a dict) + tokenizer as a HF
    model dir. `device="cuda"` initialises a large one (benchmarks at 1B-7B shapes) in seconds; a
    `vocab_size` above the tokenizer's gives the lm head a real model's width (a 32k vocabulary's cost)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    spec = config_json if isinstance(config_json, dict) else json.loads(Path(config_json).read_text())
    cfg = LlamaConfig(**spec, vocab_size=vocab_size or len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
