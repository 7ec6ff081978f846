"""Stage `ranker`: the ASC reward model, trained on (positive, negative) pairs of the same question.

With s = sigmoid(r) the ranker's score of a rationale, `ranker.loss` is
    pointwise (default, as the reference)   (1 - s(pos))^3 + s(neg)^3
    pairwise  (Bradley-Terry)               -log sigmoid(r(pos) - r(neg))
summed over pairs, mean per step. The pointwise loss makes s an absolute score that means the same
for every question, which is what ASC's weighted vote adds up across candidates; the pairwise loss
only orders the rationales of one question and leaves each question an arbitrary offset.

Pairs come from `train.data.pairs.make_pairs` (`ranker.pairs_per_question` caps them). A
`ranker.heldout_fraction` of questions is kept out; at each epoch end its pairwise accuracy
(share of pairs with r(pos) > r(neg)) and calibration (mean s of its positives and negatives,
Brier score) are measured, logged to TensorBoard and kept in DONE.json.

Samples are tokenized by `train.data.dataset.tokenize`, the function eval scores its candidates
with, and overlong ones are dropped by default: a rationale cut at max_len loses its EOS, and a
ranker trained on cut negatives learns "no EOS means wrong", a shortcut that every eval
candidate (which ends where it ends) breaks.

Output: `adapter/` (LoRA on the body), `head.safetensors` (the scalar head, fully trained),
`ranker.json` (base, tokenizer, prompt template, max_len, loss). Stage `eval` loads it with
`train.models.reward.load_ranker`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from train.config import RankerConfig
from train.data.batching import TokenBudgetBatcher
from train.data.pairs import PairSet, pairs_from_prepared
from train.data.prompt import Prompt
from train.data.tokenizer import load_tokenizer
from train.engine import distributed as dist_
from train.engine.loop import TrainTask
from train.models.adapters import expected_lora_shapes, save_adapter
from train.models.loading import check_target_modules, load_base_model, tokenizer_dir
from train.models.reward import RANKER_JSON, RewardModel, save_head
from train.stages.common import model_dtype, run_stage
from train.stages.sft import peft_lora_config


def bradley_terry(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over pairs of -log sigmoid(r_pos - r_neg); rewards = [r_pos..., r_neg...]."""
    half = rewards.shape[0] // 2
    diff = rewards[:half] - rewards[half:]
    return -F.logsigmoid(diff).sum(), {"acc": (diff > 0).float().sum().detach(), "margin": diff.sum().detach()}


def pointwise(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over pairs of (1 - s_pos)^3 + s_neg^3, s = sigmoid(r), as the reference; rewards = [r_pos..., r_neg...]."""
    half = rewards.shape[0] // 2
    s = torch.sigmoid(rewards.float())
    diff = rewards[:half] - rewards[half:]
    loss = ((1 - s[:half]) ** 3).sum() + (s[half:] ** 3).sum()
    return loss, {"acc": (diff > 0).float().sum().detach(), "margin": diff.sum().detach()}


RANKER_LOSSES = {"pointwise": pointwise, "pairwise": bradley_terry}


def heldout_metrics(module: torch.nn.Module, pairs: PairSet, max_tokens: int, pad_id: int, device: torch.device,
                    loss_fn=pointwise) -> dict[str, float]:
    """On held-out pairs, split over ranks: pairwise accuracy, loss, and calibration of s = sigmoid(r)
    (mean s of the positives and of the negatives, Brier score over both). Every rank makes the same
    number of forward calls (ZeRO-3 needs it); the extra ones repeat batch 0 and are dropped."""
    if len(pairs) == 0:
        return {}
    batches = TokenBudgetBatcher(pairs.lengths, max_tokens, shuffle=False, group_size=len(pairs)).batches(0)
    sums = torch.zeros(6, device=device)  # correct, loss, pairs, sum s(pos), sum s(neg), squared errors
    for b, counted in dist_.equal_share(batches):
        batch = {key: v.to(device) for key, v in pairs.batch(b, pad_id).items()}
        rewards = module(**batch)
        loss, terms = loss_fn(rewards)
        if counted:
            s = torch.sigmoid(rewards.float())
            half = len(b)
            brier = ((1 - s[:half]) ** 2).sum() + (s[half:] ** 2).sum()
            sums += torch.stack([terms["acc"], loss.detach().float(), torch.tensor(float(half), device=device),
                                 s[:half].sum(), s[half:].sum(), brier])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    n = float(sums[2])
    return {"ranker/heldout_acc": float(sums[0]) / n, "ranker/heldout_loss": float(sums[1]) / n,
            "ranker/heldout_s_pos": float(sums[3]) / n, "ranker/heldout_s_neg": float(sums[4]) / n,
            "ranker/heldout_brier": float(sums[5]) / (2 * n)}


def build(cfg: RankerConfig, ds_cfg: dict) -> TrainTask:
    from peft import get_peft_model, get_peft_model_state_dict

    tok = load_tokenizer(tokenizer_dir(cfg.model), cfg.model.trust_remote_code)
    train, heldout, stats = pairs_from_prepared(cfg.data, tok, cfg.ranker.heldout_fraction,
                                                cfg.ranker.pairs_per_question, cfg.ranker.seed)
    if dist_.is_main():
        print(f"[ranker] pos/neg: {train.seqs.describe()}; loss {cfg.ranker.loss}", flush=True)
        print(f"[ranker] {stats['train_pairs']} training pairs, {stats['heldout_pairs']} held-out pairs; skipped "
              f"{stats['only_pos']} questions with only positives, {stats['only_neg']} with only negatives",
              flush=True)

    base = load_base_model(cfg.model, model_dtype(cfg), ds_config=ds_cfg, scalar_head=True)
    base.config.pad_token_id = tok.pad_token_id
    check_target_modules(base, cfg.lora.target_modules)
    expected = expected_lora_shapes(base, cfg.lora.target_modules, cfg.lora.r)
    hidden = base.config.hidden_size
    torch.manual_seed(cfg.engine.seed)
    model = RewardModel(get_peft_model(base, peft_lora_config(cfg, task_type=None), adapter_name="ranker",
                                       autocast_adapter_dtype=False))  # one dtype with the head (ZeRO-3 needs it)
    model.head().requires_grad_(True)
    device = torch.device("cpu") if dist_.on_cpu() else torch.device("cuda", torch.cuda.current_device())

    def save(module: RewardModel, out: Path) -> dict:
        lora = {n: p for n, p in module.lm.named_parameters() if p.requires_grad and "lora_" in n}
        state = get_peft_model_state_dict(module.lm, state_dict=lora, adapter_name="ranker")
        save_adapter(state, module.lm.peft_config["ranker"], out / "adapter", expected)
        save_head(module.head(), out, hidden)
        (out / RANKER_JSON).write_text(json.dumps({
            "base_model": str(Path(cfg.model.path).resolve()),
            "tokenizer": str(Path(tokenizer_dir(cfg.model)).resolve()), "hidden_size": hidden,
            **Prompt.of(cfg.data).record(), "max_len": cfg.data.max_len,
            "overlong": cfg.data.overlong, "loss": cfg.ranker.loss}, indent=1))
        return {"ranker": str(out), **stats}

    loss_fn = RANKER_LOSSES[cfg.ranker.loss]
    return TrainTask(
        name="ranker", model=model, data=train,
        loss_fn=lambda module, batch: loss_fn(module(**batch)),
        save_fn=save, pad_id=tok.pad_token_id, units=len,
        collate_fn=lambda idx: train.batch(idx, tok.pad_token_id),
        evaluate_fn=lambda module: heldout_metrics(module, heldout, cfg.data.max_tokens, tok.pad_token_id, device,
                                                   loss_fn))


def main(cfg: RankerConfig) -> int:
    return run_stage("ranker", cfg, build)
