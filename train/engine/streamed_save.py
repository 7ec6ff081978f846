"""A full fine-tune's weights saved as a Hugging Face model dir without holding the model whole anywhere.

DeepSpeed's 16-bit consolidation (`save_16bit_model`) gathers every parameter into one state dict on rank 0's
CPU: 13.5 GB for a 7B model in bf16, 140 GB for 70B, beside the training process's own memory. Here every
parameter is gathered on its own (under ZeRO-3 a collective every rank joins; elsewhere a no-op), rank 0 copies
it into the current shard and writes the shard once it reaches `shard_bytes`: rank 0 holds one shard and one
parameter at a time, the other ranks nothing. The files are what `save_pretrained` writes for the Llama family
(parameters under their in-memory names, `model.safetensors` or numbered shards with
`model.safetensors.index.json`, config.json with the saved dtype, generation_config.json); models whose
on-disk names differ from their parameters' (transformers' weight conversions) are outside this trainer's scope.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from train.engine import distributed as dist_
from train.errors import TdgError

SHARD_BYTES = 2 * 2**30
INDEX = "model.safetensors.index.json"


def save_model_streamed(module: torch.nn.Module, out: Path, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `module`'s weights and config to `out` (every rank calls it; rank 0 writes). Returns
    {"model_files": n, "model_bytes": total} on rank 0, {} elsewhere."""
    import deepspeed

    main = dist_.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    persistent = set(module.state_dict().keys())  # references only: no copy, gathered or not
    tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if n in persistent)]
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_size = total = 0
    dtype = None

    def flush() -> None:
        nonlocal shard, shard_size
        tmp = out / f".shard-{len(written):05d}.tmp-{os.getpid()}"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, shard_size = {}, 0

    for name, t in tensors:
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            if main:
                copy = torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())
        if not main:
            continue
        if copy.numel() == 0:
            raise TdgError(f"{out}: {name} is empty after gathering; the save would lose it")
        dtype = dtype or (copy.dtype if copy.is_floating_point() else None)
        shard[name] = copy
        shard_size += copy.numel() * copy.element_size()
        total += copy.numel() * copy.element_size()
        if shard_size >= shard_bytes:
            flush()
    if not main:
        return {}
    if shard or not written:
        flush()
    _finish(module, out, written, total, dtype)
    return {"model_files": len(written), "model_bytes": total}


def _finish(module: torch.nn.Module, out: Path, written: list[tuple[Path, list[str]]], total: int,
            dtype: torch.dtype | None) -> None:
    """Name the shards as save_pretrained does, then write the index, config.json and generation_config.json."""
    if len(written) == 1:
        os.replace(written[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = module.config
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(module).__name__]
    config.save_pretrained(out)
    if getattr(module, "generation_config", None) is not None and module.can_generate():
        module.generation_config.save_pretrained(out)
