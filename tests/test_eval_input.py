"""Test-question input for stage eval: both field conventions, the TDG layout, named errors."""

import pytest

from tests.conftest import write_lines
from train.data.readers import read_test_questions
from train.errors import InputError


def test_math_style_problem_solution_type_level(tmp_path):
    f = write_lines(tmp_path / "math.jsonl", [
        {"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "type": "Algebra",
         "level": "Level 1"},
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "type": "Prealgebra",
         "level": "Level 3"},
    ])
    qs = read_test_questions(f)
    assert [q.gold for q in qs] == ["2", "\\frac{1}{2}"]
    assert [q.subject for q in qs] == ["Algebra", "Prealgebra"] and qs[1].level == "Level 3"
    assert qs[0].question == "What is $1+1$?"


def test_question_answer_style_with_plain_or_worked_answers(tmp_path):
    f = write_lines(tmp_path / "qa.jsonl", [
        {"question": "2+3?", "answer": "5", "subject": "arith"},
        {"question": "4+4?", "answer": "4 + 4 = 8, so \\boxed{8}."},
        {"question": "7*6?", "answer": 42},
    ])
    qs = read_test_questions(f)
    assert [q.gold for q in qs] == ["5", "8", "42"]
    assert qs[0].subject == "arith" and qs[1].subject == "default" and qs[0].level == ""


def test_repeated_questions_are_merged_counted_and_reported(tmp_path, capsys):
    from collections import Counter

    from train.data.readers import report_repeats

    f = write_lines(tmp_path / "qa.jsonl", [{"question": "2+3?", "answer": "5"}, {"question": "4+4?", "answer": "8"},
                                            {"question": "2+3?", "answer": "5"}, {"question": "2+3?", "answer": "6"}])
    repeats: Counter = Counter()
    qs = read_test_questions(f, repeats=repeats)
    assert [q.question for q in qs] == ["2+3?", "4+4?"] and repeats["questions"] == 2
    report_repeats("eval", repeats)
    assert "[eval] 2 line(s) repeat a question an earlier line asked: merged" in capsys.readouterr().out


def test_synthetic_test_split_in_tdg_layout(synthetic_raw):
    qs = read_test_questions(synthetic_raw / "test")
    assert len(qs) == 15 and len({q.subject for q in qs}) > 1
    assert all(q.gold.lstrip("-").isdigit() for q in qs)


@pytest.mark.parametrize("line, message", [
    ({"problem": "x?"}, "missing field 'solution'"),
    ({"question": "x?"}, "missing field 'answer' (or 'gold')"),
    ({"text": "x?"}, "needs 'problem'"),
    ({"question": "x?", "answer": ["5"]}, "must be str/int/float"),
    ({"question": "x?", "answer": "5", "subject": 3}, "'subject' must be str"),
    ("{not json", "invalid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    f = write_lines(tmp_path / "bad.jsonl", [{"question": "fine?", "answer": "1"}, line])
    with pytest.raises(InputError) as e:
        read_test_questions(f)
    assert f"{f}:2" in str(e.value) and message in str(e.value)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_test_questions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no test questions"):
        read_test_questions(tmp_path / "empty.jsonl")
