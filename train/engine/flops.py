"""FLOP counts for MFU (model FLOPs utilisation).

Per trained token of a decoder with N parameters in its matmuls (embeddings excluded, lm head
included), L layers, width d, and context of length s:
  forward             2N + 2·L·s·d   (the second term: attention scores and values, causal half)
  backward, inputs    2N + 2·L·s·d   (gradients w.r.t. activations: needed even for frozen weights)
  backward, weights   2·N_trainable  (only the parameters that train: tiny for LoRA)
A forward-only pass (scoring) is the first line alone. MFU = achieved FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import torch

# Dense bf16 peak per device in TFLOP/s (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A6000": 155.0, "L40": 181.0, "V100": 125.0}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls per token: everything but the input embeddings."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return total


def flops_per_token(model: torch.nn.Module, n_trainable: int, seq_len: float, train: bool = True) -> float:
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0)
    width = getattr(cfg, "hidden_size", 0)
    n = matmul_params(model)
    attn = 2.0 * layers * seq_len * width
    forward = 2.0 * n + attn
    return forward * 2 + 2.0 * n_trainable if train else forward


def peak_flops(configured_tflops: float) -> float:
    """Peak FLOP/s of this rank's device; 0 when unknown (CPU), so no MFU is logged."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return 0.0
