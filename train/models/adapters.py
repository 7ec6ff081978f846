"""LoRA adapters on disk in PEFT's format, and the check that a save is not empty.

Users of TRL, PEFT and LLaMA-Factory keep getting 40-byte adapters from ZeRO-3 runs: the
parameters were still partitioned when the state dict was taken. We take the state dict inside
`GatheredParameters` (the engine does that) and then re-open the file and check every tensor
against the shapes the model's layers imply before the save counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train.errors import TdgError

ADAPTER_FILE = "adapter_model.safetensors"


class AdapterSaveError(TdgError):
    pass


def peft_key_prefix(layer_name: str) -> str:
    """Module path in the plain model -> the key prefix PEFT uses in saved adapter files."""
    return f"base_model.model.{layer_name}"


def expected_lora_shapes(base_model: torch.nn.Module, targets: list[str], r: int) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape for every layer LoRA will adapt. Call on the base model before wrapping it;
    in/out features stay correct under ZeRO-3 even though the weights are partitioned."""
    shapes = {}
    for name, m in base_model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear):
            shapes[f"{peft_key_prefix(name)}.lora_A.weight"] = (r, m.in_features)
            shapes[f"{peft_key_prefix(name)}.lora_B.weight"] = (m.out_features, r)
    return shapes


def save_adapter(state: dict[str, torch.Tensor], peft_config, out_dir: Path,
                 expected: dict[str, tuple[int, ...]]) -> Path:
    """Write a PEFT adapter dir (safetensors + adapter_config.json) and verify it on disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / ADAPTER_FILE))
    peft_config.save_pretrained(str(out_dir))
    verify_adapter(out_dir, expected)
    return out_dir


def verify_adapter(out_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    saved = load_file(str(out_dir / ADAPTER_FILE))
    problems = []
    missing = sorted(set(expected) - set(saved))
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    for k, t in saved.items():
        if t.numel() == 0:
            problems.append(f"{k} is empty")
        elif k in expected and tuple(t.shape) != expected[k]:
            problems.append(f"{k} has shape {tuple(t.shape)}, expected {expected[k]}")
    if not saved:
        problems.append("no tensors at all")
    if problems:
        raise AdapterSaveError(f"{out_dir / ADAPTER_FILE}: adapter save is broken: " + "; ".join(problems[:5]))
