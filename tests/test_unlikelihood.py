"""The unlikelihood baseline (sft.unlikelihood): CE on positives, -log(1 - p) on negatives."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_stage
from train.config import SftConfig, load_config
from train.data.dataset import read_prepared, tokenize
from train.data.tokenizer import load_tokenizer
from train.errors import ConfigError
from train.stages.common import collate_with_values
from train.stages.sft import unlikelihood_loss


def _data(prepared_dir, base_model_dir):
    table = read_prepared(prepared_dir)
    data = tokenize(table, load_tokenizer(base_model_dir), 384)
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    is_neg = np.array([label_of[i] == "neg" for i in data.ids])
    return data, is_neg


@pytest.mark.parametrize("packing", [False, True])
def test_loss_equals_a_direct_computation(prepared_dir, base_model_dir, packing):
    from transformers import AutoModelForCausalLM

    data, is_neg = _data(prepared_dir, base_model_dir)
    picks = np.array([int(np.flatnonzero(~is_neg)[0]), int(np.flatnonzero(is_neg)[0]), int(np.flatnonzero(is_neg)[1])])
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True).eval()
    batch = collate_with_values(data, is_neg, "neg", 0, packing, True)(picks)
    loss, terms = unlikelihood_loss(model, batch, 0.7)
    ce = ul = 0.0
    for i in picks:  # one sample at a time, by hand
        seq = torch.from_numpy(data.input_ids[i].astype(np.int64))[None]
        lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
        tgt = seq[0, 1:]
        tok_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)[int(data.prompt_lens[i]) - 1:]
        if is_neg[i]:
            ul += float(-torch.log1p(-tok_lp.exp()).sum())
        else:
            ce += float(-tok_lp.sum())
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-4)
    assert float(terms["ul"]) == pytest.approx(ul, rel=1e-4)
    assert float(loss) == pytest.approx(ce + 0.7 * ul, rel=1e-4)


def _neg_logprob_change(data, is_neg, picks, base_model_dir, loss_of) -> float:
    """Mean log-prob of the negative samples' target tokens after 5 Adam steps minus before."""
    from transformers import AutoModelForCausalLM

    batch = collate_with_values(data, is_neg, "neg", 0, False, True)(picks)
    neg_rows = torch.from_numpy(is_neg[picks])

    def neg_logprob(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = (labels != -100) & neg_rows[:, None]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return float(lp[mask].mean())

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)
    before = neg_logprob(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return neg_logprob(model) - before


def test_unlikelihood_pushes_negatives_down_and_below_plain_mixing(prepared_dir, base_model_dir):
    from train.stages.common import causal_lm_loss

    data, is_neg = _data(prepared_dir, base_model_dir)
    negs, poss = np.flatnonzero(is_neg)[:4], np.flatnonzero(~is_neg)[:4]
    ul = lambda m, b: unlikelihood_loss(m, b, 1.0)[0]  # noqa: E731
    assert _neg_logprob_change(data, is_neg, negs, base_model_dir, ul) < 0  # negatives alone: pushed down
    # with positives in the batch, CE lifts the many tokens both share (negatives are mostly right),
    # but unlikelihood still leaves the negatives less likely than training on everything does
    mixed = np.concatenate([poss, negs])
    mix = _neg_logprob_change(data, is_neg, mixed, base_model_dir, lambda m, b: causal_lm_loss(m, b)[0])
    assert mix > _neg_logprob_change(data, is_neg, mixed, base_model_dir, ul)


def test_unlikelihood_needs_both_labels():
    with pytest.raises(ConfigError, match="sft.unlikelihood"):
        load_config(SftConfig, None, ["model.path=x", "data.path=y", "engine.output_dir=z", "sft.unlikelihood=1"])


@pytest.mark.slow
def test_stage_sft_with_unlikelihood_trains_and_logs_both_terms(tmp_path, prepared_dir, base_model_dir):
    out = tmp_path / "ul"
    result = run_stage("sft", [f"model.path={base_model_dir}", f"data.path={prepared_dir}", "data.max_len=384",
                               "data.max_tokens=2048", "sft.labels=[pos,neg]", "sft.unlikelihood=0.5",
                               "optim.max_steps=3", "optim.warmup_steps=1", "engine.ds_config=zero2",
                               "engine.progress=false", f"engine.output_dir={out}"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads((out / "DONE.json").read_text())
    assert done["metrics"]["global_step"] == 3 and (out / "adapter" / "adapter_model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"sft/ce", "sft/ul", "sft/loss"} <= set(events.Tags()["scalars"])
