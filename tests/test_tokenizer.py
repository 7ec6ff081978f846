"""Tokenizers and how a sample becomes tokens: the demo's trained sentencepiece model and a real 32k
Llama-family tokenizer (Mistral-7B's); BOS/EOS/pad, the prompt/rationale boundary, overlong samples."""

import json

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from tests.conftest import write_lines
from train.data.dataset import IGNORE, collate, encode, prompt_ids, read_prepared, tokenize
from train.data.prepare import PrepareOptions, prepare
from train.data.prompt import DEFAULT_TEMPLATE, render_prompt
from train.data.tokenizer import load_tokenizer


def test_round_trip_and_special_tokens(tokenizer_dir, synthetic_raw):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tok.is_fast and len(tok) == 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    rec = json.loads(next((synthetic_raw / "train").rglob("*.jsonl")).read_text().splitlines()[0])
    for text in [rec["question"], rec["generated_answer"][0], "unseen: ü ∑ 12345 \\boxed{7}\n\ttab"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert all(len(t.strip("▁")) <= 1 for t in digits)  # digits split, so numbers are digit by digit


def _table(questions, rationales, labels=None):
    cols = {"id": [str(i) for i in range(len(questions))], "question": questions, "rationale": rationales}
    if labels is not None:
        cols["label"] = labels
    return pa.table(cols)


def test_overlong_samples_are_dropped_and_counted_per_label_by_default(tokenizer_dir, synthetic_raw, tmp_path):
    out = tmp_path / "p"
    prepare(PrepareOptions(inputs=[str(synthetic_raw / "train")], output=str(out), grader="hendrycks", workers=1,
                           show_progress=False))
    table = read_prepared(out)
    tok = load_tokenizer(tokenizer_dir)
    full = tokenize(table, tok, max_len=4096)
    assert sum(full.overlong.values()) == 0 and full.prompt_too_long == 0 and len(full) == table.num_rows
    cut = int(np.median(full.lengths))
    labels = np.array(table.column("label").to_pylist())
    no_room = full.prompt_lens >= cut  # the prompt alone fills max_len: left out whatever the policy
    over = (full.lengths > cut) & ~no_room
    dropped = tokenize(table, tok, max_len=cut)
    assert dropped.prompt_too_long == int(no_room.sum())
    assert dropped.overlong == {lab: int((over & (labels == lab)).sum()) for lab in ("pos", "neg")
                                if (over & (labels == lab)).any()}
    assert len(dropped) == int((~over & ~no_room).sum()) and dropped.lengths.max() <= cut
    assert all(seq[-1] == tok.eos_token_id for seq in dropped.input_ids)  # every kept sample ends
    assert f"{dropped.overlong['neg']} neg" in dropped.describe() and "dropped (data.overlong=drop)" in \
        dropped.describe()
    assert dropped.report()["overlong"] == dict(dropped.overlong)

    cut_set = tokenize(table, tok, max_len=cut, overlong="truncate")
    assert len(cut_set) == int((~no_room).sum()) and cut_set.overlong == dropped.overlong
    ends = np.array([seq[-1] == tok.eos_token_id for seq in cut_set.input_ids])
    assert (~ends).sum() == sum(cut_set.overlong.values())  # a cut sample has no EOS: it did not end
    assert "cut (no EOS)" in cut_set.describe()

    tiny = tokenize(table, tok, max_len=int(full.prompt_lens.min()))  # every prompt fills max_len
    assert len(tiny) == 0 and tiny.prompt_too_long == table.num_rows


def test_a_sample_is_bos_prompt_rationale_eos_tokenized_as_one_text(llama32k_dir):
    """With a real Llama tokenizer a rationale tokenized alone would start with a space it does not have
    in the text; tokenized after its prompt it does not, and the prompt's ids are a prefix of the whole."""
    tok = load_tokenizer(llama32k_dir)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.pad_token_id == tok.eos_token_id  # the tokenizer has no pad: EOS pads, masked out
    question = "If $x + 2 = 5$, what is $x$?"
    rationale = "We have $x = 5 - 2 = \\boxed{3}$.\nDone."
    data = tokenize(_table([question], [rationale]), tok, 256)
    seq, plen = data.input_ids[0].tolist(), int(data.prompt_lens[0])
    whole = tok(render_prompt(DEFAULT_TEMPLATE, question) + rationale, add_special_tokens=False)["input_ids"]
    assert seq == [tok.bos_token_id, *whole, tok.eos_token_id]
    assert seq[:plen] == prompt_ids(tok, [question])[0]  # what generation feeds
    assert tok.decode(seq[1:plen]) == "Problem:\n" + question + "\nSolution:\n"
    assert tok.decode(seq[plen:-1]) == rationale
    assert tok.convert_ids_to_tokens(seq[plen]) == "We"  # no leading space: "▁We" would be the alone-tokenized id
    alone = tok(rationale, add_special_tokens=False)["input_ids"]
    assert alone[0] != seq[plen]

    # padding: EOS is pad here, but a sample's own EOS stays a target and the pad positions are masked
    short = tokenize(_table([question, question], [rationale, "\\boxed{3}"]), tok, 256)
    batch = collate(short, np.array([0, 1]), tok.pad_token_id, packing=False)
    row = 1
    n = len(short.input_ids[row])
    assert batch["labels"][row, n - 1] == tok.eos_token_id and (batch["labels"][row, n:] == IGNORE).all()
    assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
    assert (batch["labels"][row, :int(short.prompt_lens[row])] == IGNORE).all()


def test_math_rationales_keep_their_boundary_under_the_32k_tokenizer(llama32k_dir, shared_data):
    """On real MATH rationales every prompt's ids are a prefix of the whole text's (no straddling token)."""
    from train.data.readers import read_inputs

    tok = load_tokenizer(llama32k_dir)
    qs = read_inputs([shared_data / "train_gpt3.5_number_theory_8"]).questions[:60]
    questions = [q.question for q in qs for _ in q.rationales]
    rationales = [r.text for q in qs for r in q.rationales]
    assert not any(q.startswith("Problem:") for q in questions) and not any(r.startswith("Solution:")
                                                                         for r in rationales)
    prompts, targets = encode(tok, questions, rationales)
    for q, r, p, t in zip(questions, rationales, prompts, targets, strict=True):
        whole = tok(render_prompt(DEFAULT_TEMPLATE, q) + r, add_special_tokens=False)["input_ids"]
        assert [tok.bos_token_id, *whole] == p + t


@pytest.fixture(scope="module")
def one_question_four_formats(tmp_path_factory):
    """The same question through the TDG layout, the flat layout, MATH jsonl and question/answer jsonl."""
    root = tmp_path_factory.mktemp("formats")
    q = "Let $f(x) = x^2 + \\frac{1}{2}$. Find $f(3)$."
    rationale = "We compute $f(3) = 9 + \\frac12 = \\boxed{\\frac{19}{2}}$."
    write_lines(root / "tdg" / "train_gpt3.5_algebra_8" / "0.jsonl", [
        {"question": "Problem:\n" + q, "answer": "So $\\boxed{\\frac{19}{2}}$.", "level": "Level 2",
         "generated_answer": ["Solution:\n" + rationale, "Solution:\nSo \\boxed{9}."]}])
    write_lines(root / "flat" / "rows.jsonl", [
        {"id": "a", "question": q, "rationale": rationale, "gold": "\\frac{19}{2}"},
        {"id": "b", "question": q, "rationale": "So \\boxed{9}.", "gold": "\\frac{19}{2}"}])
    write_lines(root / "math.jsonl", [{"problem": q, "solution": "Hence $\\boxed{\\frac{19}{2}}$.",
                                       "type": "Algebra", "level": "Level 2"}])
    write_lines(root / "qa.jsonl", [{"question": q, "answer": "\\frac{19}{2}"}])
    return root, q


def test_one_question_gets_identical_prompt_ids_in_every_stage_and_format(one_question_four_formats, llama32k_dir):
    from train.config import DataConfig
    from train.data.dataset import tokenize_with
    from train.data.readers import read_test_questions
    from train.models.reward import candidate_samples

    root, q = one_question_four_formats
    tok = load_tokenizer(llama32k_dir)
    data_cfg = DataConfig(max_len=512)  # what neg/nat/sft/distill, score and ranker all tokenize with
    expected = prompt_ids(tok, [q])[0]
    seen = {}
    for layout in ("tdg", "flat"):
        prepare(PrepareOptions(inputs=[str(root / layout)], output=str(root / f"prepared-{layout}"), workers=1,
                               grader="hendrycks", show_progress=False))
        table = read_prepared(root / f"prepared-{layout}")
        assert table.column("question").to_pylist() == [q, q]
        data = tokenize_with(table, tok, data_cfg)
        assert len(data) == 2
        for seq, plen in zip(data.input_ids, data.prompt_lens, strict=True):
            seen[f"training/score/ranker from {layout}"] = seq[:plen].tolist()
    for name in ("math.jsonl", "qa.jsonl", "tdg"):
        (test_q,) = read_test_questions(root / name)
        assert test_q.question == q
        seen[f"eval generation from {name}"] = prompt_ids(tok, [test_q.question], data_cfg.prompt_template)[0]
        spec = {"max_len": data_cfg.max_len, "prompt_template": data_cfg.prompt_template}
        cands = candidate_samples(tok, spec, test_q.question, ["So \\boxed{9}."], [True])
        seen[f"eval ranker scoring from {name}"] = cands.input_ids[0][:cands.prompt_lens[0]].tolist()
    assert all(ids == expected for ids in seen.values()), seen
    assert tok.decode(expected[1:]) == f"Problem:\n{q}\nSolution:\n"


def test_eval_candidates_end_as_training_samples_do(llama32k_dir):
    """A finished candidate is tokenized exactly like the training sample with the same text (EOS included);
    one cut by the generation limit has no EOS."""
    from train.models.reward import candidate_samples

    tok = load_tokenizer(llama32k_dir)
    q, r = "What is $1+1$?", "It is $\\boxed{2}$."
    spec = {"max_len": 128, "prompt_template": DEFAULT_TEMPLATE}
    train = tokenize(_table([q], [r], ["pos"]), tok, 128)
    cands = candidate_samples(tok, spec, q, [r, r], [True, False])
    assert cands.input_ids[0].tolist() == train.input_ids[0].tolist()
    assert cands.input_ids[1].tolist() == train.input_ids[0].tolist()[:-1]



def test_a_token_straddling_the_prompt_end_falls_back_to_tokenizing_the_rationale_alone(llama32k_dir):
    """With a template that ends mid-word the whole text's tokens cross the boundary; the prompt must still be
    exactly what generation feeds, so the rationale is then tokenized on its own."""
    tok = load_tokenizer(llama32k_dir)
    template = "Question: {question}\nSolution"
    questions, rationales = ["What is $1+1$?", "What is $1+1$?"], ["s: it is $\\boxed{2}$.", ": it is $\\boxed{2}$."]
    prompts, targets = encode(tok, questions, rationales, template)
    whole = tok(render_prompt(template, questions[0]) + rationales[0], add_special_tokens=False)["input_ids"]
    assert whole[:len(prompts[0]) - 1] != prompts[0][1:]  # "Solutions" is one token: it straddles
    assert targets[0] == tok(rationales[0], add_special_tokens=False)["input_ids"]
    assert prompts[0] == prompt_ids(tok, [questions[0]], template)[0]
    assert [tok.bos_token_id, *tok(render_prompt(template, questions[1]) + rationales[1],
                                   add_special_tokens=False)["input_ids"]] == prompts[1] + targets[1]
