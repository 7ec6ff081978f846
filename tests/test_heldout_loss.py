"""data.heldout_fraction: held-out questions leave training and their loss is evaluated every epoch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_stage

from train.data.batching import TokenBudgetBatcher
from train.data.dataset import collate, read_prepared, tokenize
from train.data.pairs import is_heldout
from train.data.tokenizer import load_tokenizer


def test_a_batcher_over_an_index_batches_exactly_those_samples():
    lengths = np.arange(1, 41)
    index = np.array([i for i in range(40) if i % 3])
    batcher = TokenBudgetBatcher(lengths, 64, index=index)
    for epoch in (0, 1):
        batches = batcher.batches(epoch)
        assert sorted(np.concatenate(batches).tolist()) == index.tolist()
        assert all(lengths[b].max() * len(b) <= 64 for b in batches)


def _neg(tmp_path, prepared_dir, base_model_dir, name, *extra, nproc=1):
    out = tmp_path / name
    r = run_stage("neg", ["--config", "configs/tiny/neg.yaml", f"model.path={base_model_dir}",
                          f"data.path={prepared_dir}", f"engine.output_dir={out}", "data.heldout_fraction=0.25",
                          "optim.epochs=2", "engine.progress=false", "engine.save_every=0", *extra], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_heldout_loss_is_the_trained_models_loss_on_the_heldout_questions(tmp_path, prepared_dir, base_model_dir):
    out, r = _neg(tmp_path, prepared_dir, base_model_dir, "neg", "optim.max_steps=3")
    metrics = json.loads((out / "DONE.json").read_text())["metrics"]
    assert "[neg] held out:" in r.stdout
    # recompute by hand: the saved adapter's mean CE per target token over the held-out questions' negatives
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_model_dir)
    table = read_prepared(prepared_dir, labels=("neg",))
    data = tokenize(table, tok, 384)
    qid_of = dict(zip(table.column("id").to_pylist(), table.column("qid").to_pylist(), strict=True))
    held = [k for k, i in enumerate(data.ids) if is_heldout(qid_of[i], 0.25, 0)]
    assert 0 < len(held) < len(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), out / "adapter").eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(held), 16):
            batch = collate(data, np.array(held[start:start + 16]), tok.pad_token_id, packing=False)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
    assert metrics["heldout_loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert [e["step"] for e in metrics["eval_history"]] == [3]  # max_steps ends before the first epoch does
    # the trained samples are the others: the training loss is over them, not the held-out ones
    assert metrics["data"]["samples"] == len(data)


@pytest.mark.slow
def test_every_epoch_is_evaluated_on_two_zero3_ranks(tmp_path, prepared_dir, base_model_dir, zero3_partitioned):
    out, _ = _neg(tmp_path, prepared_dir, base_model_dir, "neg3", f"engine.ds_config={zero3_partitioned}", nproc=2)
    metrics = json.loads((out / "DONE.json").read_text())["metrics"]
    history = metrics["eval_history"]
    assert [e["epoch"] for e in history] == [1, 2] and all(math.isfinite(e["heldout_loss"]) for e in history)
    assert history[-1]["heldout_loss"] == metrics["heldout_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("neg/heldout_loss")] == [e["step"] for e in history]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_evaluations_of_the_run_before_it(tmp_path, prepared_dir, base_model_dir):
    """Preempted after epoch 1's evaluation, resumed to the end: DONE.json's eval_history has both epochs, the
    first from the checkpoint the resume started from, as the uninterrupted run had them."""
    import shutil

    args = ("engine.save_every=1", "engine.keep_last=1000")
    out, _ = _neg(tmp_path, prepared_dir, base_model_dir, "neg", *args)
    whole = json.loads((out / "DONE.json").read_text())["metrics"]["eval_history"]
    assert [e["epoch"] for e in whole] == [1, 2]
    # the state a preemption one step after epoch 1's evaluation leaves: later checkpoints and DONE.json gone
    resume_at = whole[0]["step"] + 1
    for tag in (out / "checkpoints").glob("step*"):
        if int(tag.name.removeprefix("step")) > resume_at:
            shutil.rmtree(tag)
    (out / "DONE.json").unlink()
    _, r = _neg(tmp_path, prepared_dir, base_model_dir, "neg", *args)
    assert f"resumed from {out / 'checkpoints' / f'step{resume_at}'}" in r.stdout
    resumed = json.loads((out / "DONE.json").read_text())["metrics"]["eval_history"]
    assert [(e["step"], e["epoch"]) for e in resumed] == [(e["step"], e["epoch"]) for e in whole]
    assert resumed[0]["heldout_loss"] == whole[0]["heldout_loss"]
    assert resumed[1]["heldout_loss"] == pytest.approx(whole[1]["heldout_loss"], rel=1e-4)
