"""The modern baselines for right and wrong rationales: DPO (pairs, SFT model as reference) and REDI."""

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import run_stage
from train.config import DpoConfig, RediConfig, load_config
from train.data.dataset import read_prepared, tokenize
from train.data.pairs import make_pairs
from train.data.tokenizer import load_tokenizer
from train.errors import ConfigError
from train.stages.common import collate_with_values
from train.stages.dpo import disable_dropout, dpo_step_loss
from train.stages.redi import redi_loss, redi_pair_loss, sample_weights


def _pairs(prepared_dir, base_model_dir):
    table = read_prepared(prepared_dir, columns=["id", "qid", "label", "question", "rationale"])
    data = tokenize(table, load_tokenizer(base_model_dir), 384)
    pairs, _, _ = make_pairs(table.column("qid").to_pylist(), table.column("label").to_pylist(), data,
                             {rid: i for i, rid in enumerate(data.ids)}, table.column("id").to_pylist(), 0.0, 0, 0)
    return data, pairs


def _lora(base_model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _seq_logprob(model, data, i) -> float:
    """Sum of log p over sample i's rationale tokens, one sample alone, by hand."""
    seq = torch.from_numpy(data.input_ids[i].astype(np.int64))[None]
    lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
    return float(lp.gather(-1, seq[0, 1:, None]).squeeze(-1)[int(data.prompt_lens[i]) - 1:].sum())


def test_dpo_loss_is_log2_before_training_and_equals_a_direct_computation(prepared_dir, base_model_dir):
    data, pairs = _pairs(prepared_dir, base_model_dir)
    model = _lora(base_model_dir).eval()
    idx = np.arange(3)
    batch = pairs.batch(idx, 0, labels=True)
    with torch.no_grad():
        loss, terms = dpo_step_loss(model, batch, 0.1)
    assert float(loss) == pytest.approx(3 * math.log(2), abs=1e-5)  # a fresh LoRA is the reference exactly
    for name, p in model.named_parameters():  # move the policy away from the reference
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    with torch.no_grad():
        loss, terms = dpo_step_loss(model, batch, 0.1)
        expected, margins = 0.0, []
        for k in idx:
            pos, neg = int(pairs.pos[k]), int(pairs.neg[k])
            policy = _seq_logprob(model, data, pos) - _seq_logprob(model, data, neg)
            with model.disable_adapter():
                reference = _seq_logprob(model, data, pos) - _seq_logprob(model, data, neg)
            margins.append(0.1 * (policy - reference))
            expected += -math.log(1 / (1 + math.exp(-margins[-1])))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(terms["margin"]) == pytest.approx(sum(margins), rel=1e-3, abs=1e-4)  # fp32 sums of ~100 tokens
    assert float(terms["reward_acc"]) == sum(m > 0 for m in margins)
    # the policy's mean per-token log-prob of each side, summed over pairs (the loop divides by the pairs)
    with torch.no_grad():
        for key, rows in (("logp_chosen", pairs.pos), ("logp_rejected", pairs.neg)):
            by_hand = sum(_seq_logprob(model, data, int(rows[k])) / _targets(data, int(rows[k])) for k in idx)
            assert float(terms[key]) == pytest.approx(by_hand, rel=1e-4)


def _targets(data, i) -> int:
    return len(data.input_ids[i]) - int(data.prompt_lens[i])


def test_dpo_turns_dropout_off_so_policy_and_reference_see_one_model(base_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True, attention_dropout=0.1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.train()
    ids = torch.arange(4, 40)[None]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout on: noisy
        assert disable_dropout(model) > 0
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dpo_steps_widen_the_margin_and_leave_the_reference_untouched(prepared_dir, base_model_dir):
    data, pairs = _pairs(prepared_dir, base_model_dir)
    model = _lora(base_model_dir)
    batch = pairs.batch(np.arange(4), 0, labels=True)
    with torch.no_grad(), model.disable_adapter():
        reference_before = _seq_logprob(model, data, int(pairs.pos[0]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss, terms = dpo_step_loss(model, batch, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1 and float(terms["reward_acc"]) == 4
    with torch.no_grad(), model.disable_adapter():
        assert _seq_logprob(model, data, int(pairs.pos[0])) == pytest.approx(reference_before, abs=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_redi_loss_equals_the_length_normalised_objective(prepared_dir, base_model_dir, packing):
    from transformers import AutoModelForCausalLM

    table = read_prepared(prepared_dir)
    data = tokenize(table, load_tokenizer(base_model_dir), 384)
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    is_neg = np.array([label_of[i] == "neg" for i in data.ids])
    weights = sample_weights(data, is_neg, 0.8)
    picks = np.array([*np.flatnonzero(~is_neg)[:2], *np.flatnonzero(is_neg)[:2]])
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True).eval()
    with torch.no_grad():
        loss, terms = redi_loss(model, collate_with_values(data, weights, "weight", 0, packing)(picks))
        pos = neg = 0.0
        for i in picks:
            per_token = _seq_logprob(model, data, i) / (len(data.input_ids[i]) - int(data.prompt_lens[i]))
            if is_neg[i]:
                neg += 0.8 * per_token
            else:
                pos += -per_token
    assert float(terms["pos"]) == pytest.approx(pos, rel=1e-4)
    assert float(terms["neg"]) == pytest.approx(neg, rel=1e-4)
    assert float(loss) == pytest.approx(pos + neg, rel=1e-4)


def test_redi_pair_loss_is_the_authors_objective_averaged_over_pairs(prepared_dir, base_model_dir):
    from transformers import AutoModelForCausalLM

    data, pairs = _pairs(prepared_dir, base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True).eval()
    idx = np.arange(3)
    with torch.no_grad():
        loss, terms = redi_pair_loss(model, pairs.batch(idx, 0, labels=True), 0.8)
        chosen = [_seq_logprob(model, data, int(pairs.pos[k])) / _targets(data, int(pairs.pos[k])) for k in idx]
        rejected = [_seq_logprob(model, data, int(pairs.neg[k])) / _targets(data, int(pairs.neg[k])) for k in idx]
    assert float(loss) == pytest.approx(sum(-c + 0.8 * r for c, r in zip(chosen, rejected, strict=True)), rel=1e-4)
    assert float(terms["logp_chosen"]) == pytest.approx(sum(chosen), rel=1e-4)
    assert float(terms["logp_rejected"]) == pytest.approx(sum(rejected), rel=1e-4)


def test_redi_steps_raise_positives_above_negatives(prepared_dir, base_model_dir):
    table = read_prepared(prepared_dir)
    data = tokenize(table, load_tokenizer(base_model_dir), 384)
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    is_neg = np.array([label_of[i] == "neg" for i in data.ids])
    picks = np.array([*np.flatnonzero(~is_neg)[:3], *np.flatnonzero(is_neg)[:3]])
    batch = collate_with_values(data, sample_weights(data, is_neg, 0.8), "weight", 0, False)(picks)
    model = _lora(base_model_dir)

    def mean_logprob(label_neg: bool) -> float:
        with torch.no_grad():
            return float(np.mean([_seq_logprob(model, data, i) for i in picks if is_neg[i] == label_neg]))

    before = mean_logprob(False), mean_logprob(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss, _ = redi_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # positives rise, and further than negatives (which share most of their tokens with positives, so
    # with alpha < 1 they may rise too: the asymmetry REDI is built on)
    after = mean_logprob(False), mean_logprob(True)
    assert after[0] > before[0] and after[0] - after[1] > before[0] - before[1]


def test_bad_settings_are_config_errors():
    paths = ["model.path=x", "data.path=y", "engine.output_dir=z"]
    with pytest.raises(ConfigError, match=r"dpo.beta: 0 is outside its range \(0, inf\)"):
        load_config(DpoConfig, None, [*paths, "dpo.beta=0"])
    with pytest.raises(ConfigError, match="dpo compares whole sequences"):
        load_config(DpoConfig, None, [*paths, "data.packing=true"])
    with pytest.raises(ConfigError, match="redi.alpha"):
        load_config(RediConfig, None, [*paths, "redi.alpha=1.5"])
    with pytest.raises(ConfigError, match="redi.unit=pair compares whole sequences"):
        load_config(RediConfig, None, [*paths, "data.packing=true"])
    assert load_config(RediConfig, None, [*paths, "data.packing=true", "redi.unit=sample"]).redi.unit == "sample"


def _tb(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(d / "tb"))
    events.Reload()
    return events


@pytest.mark.slow
def test_stage_dpo_on_two_ranks_starts_at_log2_and_learns(tmp_path, prepared_dir, base_model_dir):
    out = tmp_path / "dpo"
    result = run_stage("dpo", [f"model.path={base_model_dir}", f"data.path={prepared_dir}", "data.max_len=384",
                               "data.max_tokens=2048", "optim.max_steps=10", "optim.warmup_steps=1", "optim.lr=1e-2",
                               "engine.ds_config=zero3", "engine.progress=false", f"engine.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((out / "DONE.json").read_text())["metrics"]
    events = _tb(out)
    assert {"dpo/loss", "dpo/reward_acc", "dpo/margin", "dpo/logp_chosen", "dpo/logp_rejected"} <= set(
        events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("dpo/loss")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy is the reference (adapter off)
    assert np.mean(losses[-3:]) < losses[0] - 0.02 and m["train_pairs"] > 0
    # likelihood displacement, measured: DONE.json keeps the first and final per-token log-probs of both sides
    chosen, rejected = m["terms"]["logp_chosen"], m["terms"]["logp_rejected"]
    assert max(chosen["first"], chosen["final"], rejected["first"], rejected["final"]) < 0
    for key, entry in (("logp_chosen", chosen), ("logp_rejected", rejected)):  # the same numbers as TensorBoard's
        curve = [e.value for e in events.Scalars(f"dpo/{key}")]
        assert len(curve) == 10
        assert entry["first"] == pytest.approx(np.mean(curve[:5]), rel=1e-5)
        assert entry["final"] == pytest.approx(np.mean(curve[-5:]), rel=1e-5)
    assert "dropout off" in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["pair", "sample"])
def test_stage_redi_on_two_ranks_trains_and_logs_both_terms(tmp_path, prepared_dir, base_model_dir, unit):
    out = tmp_path / "redi"
    result = run_stage("redi", [f"model.path={base_model_dir}", f"data.path={prepared_dir}", "data.max_len=384",
                                "data.max_tokens=2048", "optim.max_steps=3", "optim.warmup_steps=1",
                                f"redi.unit={unit}", "engine.ds_config=zero2", "engine.progress=false",
                                f"engine.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((out / "DONE.json").read_text())["metrics"]
    assert m["global_step"] == 3 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert m["unit"] == unit and {"redi/loss", "redi/pos", "redi/neg"} <= set(_tb(out).Tags()["scalars"])
    if unit == "pair":  # one pair per question that has both kinds (the authors' unit)
        table = read_prepared(prepared_dir, columns=["qid", "label"])
        kinds: dict[str, set] = {}
        for qid, label in zip(table.column("qid").to_pylist(), table.column("label").to_pylist(), strict=True):
            kinds.setdefault(qid, set()).add(label)
        both = sum(k == {"pos", "neg"} for k in kinds.values())
        # at most one per question (a few questions lose their only positive or negative to data.max_len)
        assert 0.9 * both <= m["train_pairs"] <= both
        assert "logp_chosen" in m["terms"] and "logp_rejected" in m["terms"]
