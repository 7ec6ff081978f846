"""Measured GPU memory for DONE.json, in the unit `tdg plan` predicts (bench/gpu_stages.py sets them side by side)."""

from __future__ import annotations

import torch


def peak_memory() -> dict[str, float]:
    """{"peak_memory_gib": this rank's peak allocated GPU memory} where a GPU was used, {} elsewhere. Allocated,
    not reserved: the CUDA context and the allocator's cache are the plan's CONTEXT_GIB, outside this number."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {}
