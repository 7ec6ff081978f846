"""End to end on real text: a slice of the authors' GPT-3.5 MATH rationales (40 number-theory questions),
Mistral-7B's 32k tokenizer and a tiny Llama of vocabulary 32,000, through prepare -> neg -> nat -> score ->
distill -> export -> ranker -> eval, eval reading MATH-style test lines. Skips when ../shared is absent."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from tests.conftest import REPO, run_stage, write_lines
from train.data.dataset import prompt_ids, read_prepared, tokenize
from train.data.prompt import DEFAULT_TEMPLATE, render_prompt
from train.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
MAX_LEN = 1024
SUBJECT = "train_gpt3.5_number_theory_8"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_data, llama32k_dir):
    from train.data.prepare import PrepareOptions, prepare
    from train.export import export
    from train.models.loading import build_tiny_model

    root = tmp_path_factory.mktemp("real")
    src = shared_data / SUBJECT
    train_dir = root / "raw" / SUBJECT
    train_dir.mkdir(parents=True)
    for name in ("0.jsonl", "1.jsonl", "2.jsonl", "3.jsonl"):  # 10 questions each
        shutil.copy(src / name, train_dir / name)
    # MATH-style test lines: 5 unseen questions and one seen in training, problems without a "Problem:" label
    held = [json.loads(line) for line in (src / "4.jsonl").read_text().splitlines()[:5]]
    seen = json.loads((src / "0.jsonl").read_text().splitlines()[0])
    test = write_lines(root / "test.jsonl", [
        {"problem": rec["question"].removeprefix("Problem:\n"), "solution": rec["answer"], "type": "Number Theory",
         "level": rec.get("level", "")} for rec in [*held, seen]])
    prepare(PrepareOptions(inputs=[str(root / "raw")], output=str(root / "prepared"), workers=1,
                           tokenizer=str(llama32k_dir), show_progress=False))
    spec = json.loads((REPO / "configs" / "tiny" / "model.json").read_text())
    base = build_tiny_model({**spec, "max_position_embeddings": 2 * MAX_LEN}, llama32k_dir, root / "base", seed=0)

    common = [f"model.path={base}", f"data.path={root / 'prepared'}", f"data.max_len={MAX_LEN}",
              "data.max_tokens=4096", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.max_steps=3",
              "engine.ds_config=zero2", "engine.progress=false"]
    logs = {}

    def stage(name: str, overrides: list[str], nproc: int = 2) -> None:
        result = run_stage(name, overrides, nproc=nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        logs[name] = result.stdout

    stage("neg", [*common, f"engine.output_dir={root / 'neg'}"])
    stage("nat", [*common, f"engine.output_dir={root / 'nat'}", f"nat.neg_adapter={root / 'neg'}",
                  "nat.gate_dim=16"])
    stage("score", [f"data.path={root / 'prepared'}", f"data.max_len={MAX_LEN}", "data.max_tokens=4096",
                    f"score.nat_dir={root / 'nat'}", "engine.progress=false", f"engine.output_dir={root / 'score'}"])
    stage("distill", [*common, f"distill.scores={root / 'score'}", f"engine.output_dir={root / 'distill'}"])
    export(root / "distill", root / "export")
    stage("ranker", [*common, f"engine.output_dir={root / 'ranker'}"])
    stage("eval", ["--model", str(root / "export"), "--test", str(test), "--ranker", str(root / "ranker"),
                   "--num-samples", "2", "--output", str(root / "eval"), "eval.max_new_tokens=16",
                   "eval.batch_questions=3", "engine.progress=false"], nproc=1)
    return root, logs


def _lengths_by_label(root, tok):
    table = read_prepared(root / "prepared")
    lengths = tokenize(table, tok, max_len=1 << 30).lengths
    return lengths, np.array(table.column("label").to_pylist())


def test_prepare_reports_token_lengths_per_label_and_what_each_max_len_keeps(real_run, llama32k_dir):
    root, _ = real_run
    stats = json.loads((root / "prepared" / "stats.json").read_text())
    assert stats["length_unit"] == "tokens"
    lengths, labels = _lengths_by_label(root, load_tokenizer(llama32k_dir))
    for label in ("pos", "neg"):
        got = stats["subjects"]["number_theory"]["lengths"][label]
        lens = lengths[labels == label]
        assert got["samples"] == len(lens) > 0
        assert got["p50"] == int(np.percentile(lens, 50)) and got["max"] == int(lens.max())
        for m in (256, 512, 1024, 2048):  # the same stages' tokenization: BOS + prompt + rationale + EOS
            assert got["keeps"][str(m)] == pytest.approx(float((lens <= m).mean()), abs=1e-4)
    assert stats["subjects"]["ALL"]["lengths"]["neg"]["p90"] > stats["subjects"]["ALL"]["lengths"]["pos"]["p50"]


def test_every_stage_ran_on_real_text_and_counted_what_max_len_dropped(real_run, llama32k_dir):
    root, logs = real_run
    lengths, labels = _lengths_by_label(root, load_tokenizer(llama32k_dir))
    over = {label: int(((lengths > MAX_LEN) & (labels == label)).sum()) for label in ("pos", "neg")}
    for name, label in (("neg", "neg"), ("nat", "pos"), ("distill", "pos")):
        m = json.loads((root / name / "DONE.json").read_text())["metrics"]
        assert m["global_step"] == 3 and math.isfinite(m["first_loss"]) and math.isfinite(m["final_loss"])
        assert m["data"]["overlong"].get(label, 0) == over[label] and m["data"]["overlong_policy"] == "drop"
        assert m["data"]["samples"] == int(((lengths <= MAX_LEN) & (labels == label)).sum())
        assert f"over data.max_len={MAX_LEN} dropped" in logs[name]
    ranker = json.loads((root / "ranker" / "DONE.json").read_text())["metrics"]
    assert ranker["data"]["overlong"] == {k: v for k, v in over.items() if v}
    assert {"heldout_acc", "heldout_s_pos", "heldout_s_neg", "heldout_brier"} <= set(ranker)
    manifest = json.loads((root / "score" / "manifest.json").read_text())
    assert manifest["prompt_template"] == DEFAULT_TEMPLATE
    assert manifest["samples"] == int(((lengths <= MAX_LEN) & (labels == "pos")).sum())
    assert json.loads((root / "export" / "tdg.json").read_text())["prompt_template"] == DEFAULT_TEMPLATE


def test_eval_prompts_math_test_lines_exactly_as_training_did(real_run, llama32k_dir):
    root, _ = real_run
    tok = load_tokenizer(llama32k_dir)
    recs = [json.loads(line) for line in (root / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and {r["subject"] for r in recs} == {"Number Theory"}
    for r in recs:
        assert r["prompt"] == render_prompt(DEFAULT_TEMPLATE, r["question"])
        assert r["prompt"].startswith("Problem:\n") and r["prompt"].count("Problem:") == 1
        assert all(isinstance(s["ranker"], float) for s in r["samples"])
    # the question seen in training: eval's prompt ids are the training sample's prompt ids
    table = read_prepared(root / "prepared")
    data = tokenize(table, tok, MAX_LEN)
    seen = recs[-1]
    rows = {rid for rid, q in zip(table.column("id").to_pylist(), table.column("question").to_pylist(), strict=True)
            if q == seen["question"]}
    k = next(i for i, rid in enumerate(data.ids) if rid in rows)
    assert data.input_ids[k][:data.prompt_lens[k]].tolist() == prompt_ids(tok, [seen["question"]])[0]
    assert [tok.bos_token_id, *tok(seen["prompt"], add_special_tokens=False)["input_ids"]] == \
        prompt_ids(tok, [seen["question"]])[0]
