"""Stage `redi`: Reinforcement Distillation (Xu et al. 2025, arXiv 2505.24850), reference-free.

The second stage of the REDI recipe: after SFT on positives (`model.path`: a merged SFT model, e.g.
`tdg export` of a stage-sft output), a fresh LoRA trains on positives and negatives together. With
l(y) the sum of log p(y|x) over a rationale's |y| tokens, per sample:

    positive  -l(y+) / |y+|          negative  alpha * l(y-) / |y-|

averaged over the step's samples (each sample counts once, whatever its length). The negative term
is unbounded below; `redi.alpha` < 1 damps it (the paper's recommended 0.8), which the authors found
keeps training stable where the symmetric objective collapses.
Output: `adapter/` (a PEFT LoRA over model.path), as stage sft.
"""

from __future__ import annotations

import numpy as np
import torch

from train.config import RediConfig
from train.engine.loop import TrainTask
from train.stages.common import collate_with_values, is_negative, load_stage_data, run_stage, token_logprobs
from train.stages.sft import lora_model


def sample_weights(data, negative: np.ndarray, alpha: float) -> np.ndarray:
    """Per sample: -1/|y| for a positive, alpha/|y| for a negative (|y| its target tokens)."""
    targets = (data.lengths - data.prompt_lens).astype(np.float32)
    return np.where(negative, alpha, -1.0).astype(np.float32) / np.maximum(targets, 1)


def redi_loss(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Sum over samples of the REDI objective; batch["weight"] holds each sample's weight at its positions."""
    lp, mask = token_logprobs(module, batch)
    w = batch["weight"][:, 1:].to(lp.dtype) * mask
    terms = w * lp
    return terms.sum(), {"pos": terms[w < 0].sum().detach(), "neg": terms[w > 0].sum().detach()}


def build(cfg: RediConfig, ds_cfg: dict) -> TrainTask:
    data, tok = load_stage_data("redi", cfg, labels=("pos", "neg"))
    weights = sample_weights(data, is_negative(cfg, data), cfg.redi.alpha)
    model, save = lora_model(cfg, ds_cfg, "redi")
    return TrainTask(name="redi", model=model, data=data, loss_fn=redi_loss, pad_id=tok.pad_token_id, units=len,
                     collate_fn=collate_with_values(data, weights, "weight", tok.pad_token_id, cfg.data.packing,
                                                    cfg.data.mask_prompt),
                     save_fn=lambda module, out: {**save(module, out), "samples": len(data)})


def main(cfg: RediConfig) -> int:
    return run_stage("redi", cfg, build)
