"""Stage `redi`: Reinforcement Distillation (Xu et al. 2025, arXiv 2505.24850), reference-free.

The second stage of the REDI recipe: after SFT on positives (`model.path`: a merged SFT model, e.g.
`tdg export` of a stage-sft output), a fresh LoRA trains on positives and negatives together. With
l(y) the sum of log p(y|x) over a rationale's |y| tokens, the objective is

    -l(y+) / |y+|  +  alpha * l(y-) / |y-|

`redi.unit` says over what it is averaged:
  pair    (default, the authors' unit) one (positive, negative) pair per question that has both
          (`redi.pairs_per_question`, 1 as in the paper), the objective averaged over pairs;
  sample  every positive and negative rationale on its own (each term averaged over the step's samples),
          questions with one kind included: the mode this project shipped first, kept for comparison.
The negative term is unbounded below; `redi.alpha` < 1 damps it (the paper's recommended 0.8), which the
authors found keeps training stable where the symmetric objective collapses.
Output: `adapter/` (a PEFT LoRA over model.path), as stage sft. Logged: the positive and negative terms,
and in pair mode the mean per-token log-prob of each side (`logp_chosen`, `logp_rejected`).
"""

from __future__ import annotations

import numpy as np
import torch

from train.config import RediConfig
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.stages.common import (
    collate_with_values,
    is_negative,
    load_pair_data,
    load_stage_data,
    run_stage,
    sequence_logprobs,
    token_logprobs,
)
from train.stages.sft import lora_model


def sample_weights(data, negative: np.ndarray, alpha: float) -> np.ndarray:
    """Per sample: -1/|y| for a positive, alpha/|y| for a negative (|y| its target tokens)."""
    targets = (data.lengths - data.prompt_lens).astype(np.float32)
    return np.where(negative, alpha, -1.0).astype(np.float32) / np.maximum(targets, 1)


def redi_loss(module: torch.nn.Module, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """Sample unit: the sum over samples of the REDI objective; batch["weight"] holds each sample's weight at
    its positions."""
    lp, mask = token_logprobs(module, batch, chunk)
    w = batch["weight"][:, 1:].to(lp.dtype) * mask
    terms = w * lp
    return terms.sum(), {"pos": terms[w < 0].sum().detach(), "neg": terms[w > 0].sum().detach()}


def redi_pair_loss(module: torch.nn.Module, batch: dict, alpha: float, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """Pair unit: the sum over pairs of -l(y+)/|y+| + alpha l(y-)/|y-|; rows 0..B-1 the positives, B..2B-1
    their negatives (`PairSet.batch`)."""
    total, tokens = sequence_logprobs(module, batch, chunk)
    per_token = total / tokens.clamp(min=1)
    half = per_token.shape[0] // 2
    pos, neg = -per_token[:half].sum(), alpha * per_token[half:].sum()
    return pos + neg, {"pos": pos.detach(), "neg": neg.detach(), "logp_chosen": per_token[:half].sum().detach(),
                       "logp_rejected": per_token[half:].sum().detach()}


def build(cfg: RediConfig, ds_cfg: dict) -> TrainTask:
    if cfg.redi.unit == "pair":
        pairs, tok, stats = load_pair_data("redi", cfg, cfg.redi.pairs_per_question, cfg.redi.seed)
        if dist_.is_main():
            print(f"[redi] unit pair, alpha {cfg.redi.alpha}", flush=True)
        model, save = lora_model(cfg, ds_cfg, "redi")
        return TrainTask(name="redi", model=model, data=pairs, pad_id=tok.pad_token_id, units=len,
                         loss_fn=lambda engine, batch: redi_pair_loss(engine, batch, cfg.redi.alpha,
                                                                        cfg.model.loss_chunk_tokens),
                         collate_fn=lambda idx: pairs.batch(idx, tok.pad_token_id, labels=True),
                         save_fn=lambda module, out: {**save(module, out), **stats, "unit": "pair"})
    data, tok = load_stage_data("redi", cfg, labels=("pos", "neg"))
    weights = sample_weights(data, is_negative(cfg, data), cfg.redi.alpha)
    model, save = lora_model(cfg, ds_cfg, "redi")
    return TrainTask(name="redi", model=model, data=data, pad_id=tok.pad_token_id, units=len,
                     loss_fn=lambda module, batch: redi_loss(module, batch, cfg.model.loss_chunk_tokens),
                     collate_fn=collate_with_values(data, weights, "weight", tok.pad_token_id, cfg.data.packing,
                                                    cfg.data.mask_prompt),
                     save_fn=lambda module, out: {**save(module, out), "samples": len(data), "unit": "sample"})


def main(cfg: RediConfig) -> int:
    return run_stage("redi", cfg, build)
