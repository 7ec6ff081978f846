"""One precision policy for every stage (`engine.precision: auto | bf16 | fp32`; auto: bf16 on GPU, fp32 on CPU).

Under bf16 every parameter of the model is bf16: the frozen base and the trainable LoRA, NAT gate and
ranker head alike (PEFT's upcast of adapters to fp32 is turned off, so ZeRO-3 sees one dtype).
DeepSpeed's optimizer holds fp32 master copies of the trainable parameters, gradients accumulate in
fp32 (`data_types.grad_accum_dtype`), and adapters, gate and head are saved in fp32 from those
masters; a full fine-tune is saved in bf16, as 7B checkpoints usually are, from DeepSpeed's 16-bit
consolidation (one layer at a time onto rank 0), so no rank ever holds the fp32 masters of the whole
model. Inference stages (score, eval) load every weight in the same dtype. Under fp32 everything is
fp32. bf16 runs on DeepSpeed's CPU accelerator too, which is how CI tests it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve(setting: str, on_cpu: bool) -> str:
    """'bf16' or 'fp32' for an `engine.precision` setting on this machine."""
    if setting == "auto":
        return "fp32" if on_cpu else "bf16"
    if setting not in DTYPES:
        raise ValueError(f"engine.precision must be auto, bf16 or fp32, got {setting!r}")
    return setting


def dtype(setting: str, on_cpu: bool) -> torch.dtype:
    return DTYPES[resolve(setting, on_cpu)]


def fp32_masters(named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """The full fp32 master copy of each low-precision trainable parameter (a collective: every rank calls it).
    Empty when the parameters are fp32 themselves (no masters exist)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, p in named_params:
        if p.dtype == torch.float32:
            continue
        full = safe_get_full_fp32_param(p)
        if full is not None:
            masters[name] = full.detach().float().cpu()
    return masters


@contextlib.contextmanager
def master_weights(named_params: list[tuple[str, torch.nn.Parameter]], masters: dict[str, torch.Tensor]) -> Iterator:
    """Within the block the parameters hold their fp32 masters (gathered, full shape), so a save writes those;
    the low-precision values are put back afterwards."""
    saved = {}
    try:
        for name, p in named_params:
            if name in masters:
                saved[name] = p.data
                p.data = masters[name].to(p.device).reshape(p.data.shape)  # called inside a ZeRO-3 gather
        yield
    finally:
        for name, p in named_params:
            if name in saved:
                p.data = saved[name]
