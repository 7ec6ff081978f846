"""Stage `dpo`: Direct Preference Optimization (Rafailov et al. 2023) on (positive, negative) pairs.

The baseline a user holding right and wrong rationales reaches for today, as TRL's DPOTrainer runs
it with LoRA: start from an SFT model on positives (`model.path`: a merged one, e.g. `tdg export` of
a stage-sft output), train a fresh LoRA on it, and take the same model with the adapter disabled as
the reference. With l(y) the sum of log p(y|x) over a rationale's tokens, per pair:

    -log sigmoid(beta * ((l(y+) - l_ref(y+)) - (l(y-) - l_ref(y-))))

summed over pairs, mean per step. The reference log-probs come from a no-grad forward with the
adapter off in the same step: the reference is the weights the adapter sits on, so nothing needs to
be stored, and under ZeRO-3 it costs no extra memory for a second model.

Pairs: `train.data.pairs.pairs_from_prepared` (every rationale used; questions with one kind only skipped).
Dropout is off (`dpo.disable_dropout`, TRL's default): LoRA's dropout and the model's attention dropout.
Output: `adapter/` (a PEFT LoRA over model.path), as stage sft. Logged per step (TensorBoard `dpo/*`; first and
final values in DONE.json's `terms`): the loss, the reward accuracy (share of pairs with a positive
implicit-reward margin), the mean margin, and the policy's mean per-token log-prob of the chosen and of the
rejected rationales (`logp_chosen`, `logp_rejected`), so likelihood displacement is measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.config import DpoConfig
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.stages.common import load_pair_data, run_stage, sequence_logprobs
from train.stages.sft import lora_model


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float,
             tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sum over pairs of the DPO loss; policy and reference are [2B] log-probs, positives first. With `tokens`
    ([2B] target tokens per row), also the policy's mean per-token log-prob of chosen and of rejected, summed
    over pairs: when both fall, DPO is displacing the positives' likelihood too (the failure REDI describes)."""
    half = policy.shape[0] // 2
    logratio = policy - reference
    margin = logratio[:half] - logratio[half:]
    loss = -F.logsigmoid(beta * margin).sum()
    terms = {"reward_acc": (margin > 0).float().sum().detach(), "margin": (beta * margin).sum().detach()}
    if tokens is not None:
        per_token = (policy / tokens.clamp(min=1)).detach()
        terms.update(logp_chosen=per_token[:half].sum(), logp_rejected=per_token[half:].sum())
    return loss, terms


def dpo_step_loss(model: torch.nn.Module, batch: dict, beta: float, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """The DPO loss of a pair batch for `model` (a PEFT model, or the DeepSpeed engine around one), the
    reference being the same model with its adapter disabled."""
    from peft import PeftModel

    peft_model = model if isinstance(model, PeftModel) else model.module
    with torch.no_grad(), peft_model.disable_adapter():
        reference, _ = sequence_logprobs(peft_model, batch, chunk)
    policy, tokens = sequence_logprobs(model, batch, chunk)
    return dpo_loss(policy, reference, beta, tokens)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout to p = 0, as TRL's DPOTrainer does (`disable_dropout=True`): with dropout on, the policy
    and the reference (the same weights, adapter off) see different masks and the implicit reward is noisy.
    Returns how many dropout modules were switched off."""
    switched = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, switched = 0.0, switched + 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            m.attention_dropout, switched = 0.0, switched + 1  # attention modules keep a float, not a module
    return switched


def build(cfg: DpoConfig, ds_cfg: dict) -> TrainTask:
    pairs, tok, stats = load_pair_data("dpo", cfg, cfg.dpo.pairs_per_question, cfg.dpo.seed)
    model, save = lora_model(cfg, ds_cfg, "dpo")
    if cfg.dpo.disable_dropout:
        switched = disable_dropout(model)
        if dist_.is_main():
            print(f"[dpo] beta {cfg.dpo.beta}; dropout off ({switched} dropout modules; dpo.disable_dropout, as TRL)",
                  flush=True)

    return TrainTask(name="dpo", model=model, data=pairs, pad_id=tok.pad_token_id, units=len,
                     loss_fn=lambda engine, batch: dpo_step_loss(engine, batch, cfg.dpo.beta,
                                                                 cfg.model.loss_chunk_tokens),
                     collate_fn=lambda idx: pairs.batch(idx, tok.pad_token_id, labels=True),
                     save_fn=lambda module, out: {**save(module, out), **stats})


def main(cfg: DpoConfig) -> int:
    return run_stage("dpo", cfg, build)
