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
Output: `adapter/` (a PEFT LoRA over model.path), as stage sft. Logged per step: the loss, the
reward accuracy (share of pairs with a positive implicit-reward margin) and the mean margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.config import DpoConfig
from train.data.pairs import pairs_from_prepared
from train.data.tokenizer import load_tokenizer
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.models.loading import tokenizer_dir
from train.stages.common import run_stage, token_logprobs
from train.stages.sft import lora_model


def sequence_logprobs(module: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[B] sum of log p over each row's target tokens."""
    lp, _ = token_logprobs(module, batch)
    return lp.sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Sum over pairs of the DPO loss; policy and reference are [2B] log-probs, positives first."""
    half = policy.shape[0] // 2
    logratio = policy - reference
    margin = logratio[:half] - logratio[half:]
    loss = -F.logsigmoid(beta * margin).sum()
    return loss, {"reward_acc": (margin > 0).float().sum().detach(), "margin": (beta * margin).sum().detach()}


def dpo_step_loss(model: torch.nn.Module, batch: dict, beta: float) -> tuple[torch.Tensor, dict]:
    """The DPO loss of a pair batch for `model` (a PEFT model, or the DeepSpeed engine around one), the
    reference being the same model with its adapter disabled."""
    from peft import PeftModel

    peft_model = model if isinstance(model, PeftModel) else model.module
    with torch.no_grad(), peft_model.disable_adapter():
        reference = sequence_logprobs(peft_model, batch)
    return dpo_loss(sequence_logprobs(model, batch), reference, beta)


def build(cfg: DpoConfig, ds_cfg: dict) -> TrainTask:
    tok = load_tokenizer(tokenizer_dir(cfg.model), cfg.model.trust_remote_code)
    pairs, _, stats = pairs_from_prepared(cfg.data, tok, 0.0, cfg.dpo.pairs_per_question, cfg.dpo.seed)
    if dist_.is_main():
        print(f"[dpo] pos/neg: {pairs.seqs.describe()}; {stats['train_pairs']} pairs, beta {cfg.dpo.beta}; skipped "
              f"{stats['only_pos']} questions with only positives, {stats['only_neg']} with only negatives",
              flush=True)
    model, save = lora_model(cfg, ds_cfg, "dpo")

    return TrainTask(name="dpo", model=model, data=pairs, pad_id=tok.pad_token_id, units=len,
                     loss_fn=lambda engine, batch: dpo_step_loss(engine, batch, cfg.dpo.beta),
                     collate_fn=lambda idx: pairs.batch(idx, tok.pad_token_id, labels=True),
                     save_fn=lambda module, out: {**save(module, out), **stats})


def main(cfg: DpoConfig) -> int:
    return run_stage("dpo", cfg, build)
