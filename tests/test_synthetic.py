"""The demo's synthetic data: the teacher's regime, the splits, and prepare's regime table."""

import json

import pytest

from tests.conftest import write_lines
from train.data.prepare import PrepareOptions, format_stats, prepare
from train.data.synthetic import ANSWER_ONLY_EVERY, CUE, _questions, generate


def _texts(path):
    return {json.loads(line)["question"] for f in sorted(path.rglob("*.jsonl")) for line in f.read_text().splitlines()}


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The demo's splits at a third of its size (no model involved: seconds)."""
    return generate(tmp_path_factory.mktemp("raw"), n_train=300, n_test=300, n_valid=200, n_pretrain=3000, seed=3)


def test_teacher_data_in_the_reference_regime(demo_like, tmp_path):
    """The regime of the GPT-3.5 MATH rationales (36% positive, 36% of questions without a positive, fewer
    positives on harder problems), as prepare grades it and prints it."""
    stats = prepare(PrepareOptions(inputs=[str(demo_like / "train")], output=str(tmp_path / "p"), workers=1,
                                   grader="hendrycks", show_progress=False))
    regime = stats["regime"]
    overall = regime["level"]["ALL"]
    assert 0.30 <= overall["pos_share"] <= 0.45 and 0.25 <= overall["q_no_pos_share"] <= 0.40
    assert overall == regime["subject"]["ALL"] and overall["questions"] == 300
    levels = [regime["level"][f"Level {k}"]["pos_share"] for k in range(1, 6)]
    assert levels[0] > levels[2] > levels[4] and levels[4] < 0.2  # long chains fail more often
    table = format_stats(stats)
    assert "q no pos" in table and f"{100 * overall['pos_share']:8.1f}%" in table
    assert "level Level 5" in table and "subject mixed" in table


def test_negatives_have_most_of_their_steps_right(demo_like):
    negative_steps, wrong = 0, 0
    for f in (demo_like / "train").rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            q = json.loads(line)
            gold = q["answer"].rsplit("\\boxed{", 1)[1].split("}")[0]
            for text, errors in zip(q["generated_answer"], q["step_errors"], strict=True):
                if text.rsplit("\\boxed{", 1)[1].split("}")[0] != gold:
                    negative_steps += q["steps"]
                    wrong += errors
    assert 0 < wrong / negative_steps < 0.5  # measured 0.38 on 900 questions


def test_splits_are_disjoint_and_the_base_sees_short_chains_only(demo_like):
    splits = {name: _texts(demo_like / name) for name in ("train", "test", "valid")}
    pretrain = [json.loads(line) for line in (demo_like / "pretrain" / "gold.jsonl").read_text().splitlines()]
    splits["pretrain"] = {r["question"].replace(CUE, "") for r in pretrain}  # a question, cued or not
    assert [len(v) for v in splits.values()] == [300, 300, 200, 3000]
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    assert {r["level"] for r in pretrain} == {"Level 1", "Level 2"}
    valid_levels = {json.loads(line)["level"] for f in (demo_like / "valid").rglob("*.jsonl")
                    for line in f.read_text().splitlines()}
    assert valid_levels == {f"Level {k}" for k in range(1, 6)}
    # the validation split is drawn from its own seed: not the test generator's stream under another name
    assert not splits["valid"] & {q["question"] for _, q in _questions(3, "test", 400, 0, (1, 2, 3, 4, 5), set())}


def test_a_question_another_split_holds_is_skipped():
    first = [q["question"] for _, q in _questions(0, "test", 3, 0, (1,), set())]
    again = [q["question"] for _, q in _questions(0, "test", 3, 0, (1,), {first[0]})]
    assert again[1:] == first[1:] and first[0] not in again and len(set(again)) == 3  # the next one takes its place


def test_regime_table_counts_questions_without_a_positive_or_a_negative(tmp_path):
    rows = []
    for q, level, labels in (("a", "Level 1", "pp"), ("b", "Level 1", "pn"), ("c", "Level 2", "nn"),
                             ("d", "Level 2", "nnn")):
        rows += [{"question": f"{q}?", "rationale": f"r{k} \\boxed{{1}}", "gold": "1", "subject": "s",
                  "level": level, "label": {"p": "pos", "n": "neg"}[lab]} for k, lab in enumerate(labels)]
    f = write_lines(tmp_path / "in.jsonl", rows)
    stats = prepare(PrepareOptions(inputs=[str(f)], output=str(tmp_path / "p"), workers=1, show_progress=False))
    level = stats["regime"]["level"]
    assert level["Level 1"] == {"questions": 2, "rationales": 4, "pos_share": 0.75, "q_no_pos_share": 0.0,
                                "q_no_neg_share": 0.5}
    assert level["Level 2"] == {"questions": 2, "rationales": 5, "pos_share": 0.0, "q_no_pos_share": 1.0,
                                "q_no_neg_share": 0.0}
    assert level["ALL"]["q_no_pos_share"] == 0.5 and level["ALL"]["pos_share"] == round(3 / 9, 4)


def test_the_cued_base_learns_chains_behind_a_cue_and_answers_the_tasks_own_questions_directly(demo_like):
    """The demo's base (issue 25): the skill (worked chains) is there behind a cue sentence the task never uses;
    the task's own questions it saw answered without a chain. The teacher's rationales then teach the habit."""
    pretrain = [json.loads(line) for line in (demo_like / "pretrain" / "gold.jsonl").read_text().splitlines()]
    cued = [r for r in pretrain if CUE in r["question"]]
    plain = [r for r in pretrain if CUE not in r["question"]]
    assert len(cued) == 3000 and len(plain) == -(-3000 // ANSWER_ONLY_EVERY)
    assert all(r["rationale"].count("\n") >= 3 for r in cued)  # start, two or more steps, answer
    assert all(r["rationale"] == "Solution:\nThe answer is \\boxed{" + r["rationale"].split("{")[1] for r in plain)
    def value(r):
        return r["rationale"].rsplit("\\boxed{", 1)[1].split("}")[0]

    answers = {r["question"].replace(CUE, ""): value(r) for r in cued}
    assert all(answers[r["question"]] == value(r) for r in plain)  # the same value, without the chain
    for split in ("train", "test", "valid"):
        assert not any(CUE in q for q in _texts(demo_like / split)), split
