import time

import pytest

from train.data.answers import last_boxed
from train.data.graders import get_grader, normalize_hendrycks
from train.data.grading import OK, TIMEOUT, grade_pairs

# (gold, pred, math-verify says equal, hendrycks says equal)
PAIRS = [
    ("\\frac{1}{2}", "0.5", True, True),
    ("\\frac12", "\\frac{1}{2}", True, True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True, True),
    ("\\tfrac{3}{4}", "3/4", True, True),
    ("-\\frac{3}{10}", "-\\frac{9}{14}", False, False),
    ("5\\text{ cm}", "5", True, True),
    ("90^\\circ", "90", True, True),
    ("90^{\\circ}", "45", False, False),
    ("(1,2]", "(1, 2]", True, True),
    ("(1,2]", "[1,2]", False, False),
    ("[2,12)", "[0,\\infty)", False, False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True, True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False, False),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True, False),
    ("2\\sqrt3", "2\\sqrt{3}", True, True),
    ("x = 5", "5", True, True),
    ("10\\%", "10", True, True),
    ("\\$18.90", "18.90", True, True),
    ("1/3", "0.3333", False, False),
    ("12", "12.0", True, False),
    ("7", "8", False, False),
]


@pytest.mark.parametrize("gold,pred,mv,hd", PAIRS)
def test_grader_table(gold, pred, mv, hd):
    assert get_grader("math-verify")(gold, pred) is mv
    assert get_grader("hendrycks")(gold, pred) is hd


def test_hendrycks_normalisation_details():
    assert normalize_hendrycks("\\left( 3, \\frac12 \\right)") == "(3,\\frac{1}{2})"
    assert normalize_hendrycks(".5") == "\\frac{1}{2}"


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} and then \\fbox{ 3 }", "3"),
    ("nested \\boxed{\\frac{a}{\\sqrt{b}}} end", "\\frac{a}{\\sqrt{b}}"),
    ("spaced \\boxed 5$", "5"),
    ("no answer here", None),
    ("unterminated \\boxed{3", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_grade_pairs_matches_in_process_grader_and_dedups():
    pairs = [(g, p) for g, p, _, _ in PAIRS] * 2
    grades = grade_pairs(pairs, "math-verify", workers=2, timeout=10, show_progress=False)
    assert [g.equal for g in grades] == [mv for _, _, mv, _ in PAIRS] * 2
    assert all(g.status == OK for g in grades)


@pytest.mark.parametrize("slow", [
    ("(x+1)^{2000}", "x^{2000}+1"),  # ~16 s of polynomial expansion in sympy
    ("\\frac{1}{(x+1)^{500}}-\\frac{1}{(x+2)^{500}}", "0"),  # > 20 s
])
def test_pathological_expression_times_out_without_hanging_the_run(slow):
    pairs = [("2", "2.0"), slow, ("3", "4")]
    t0 = time.monotonic()
    grades = grade_pairs(pairs, "math-verify", workers=1, timeout=1.0, chunk_size=8, show_progress=False)
    assert grades[1].status == TIMEOUT and grades[1].equal is False
    assert grades[0].equal is True and grades[2].equal is False  # the rest of the chunk still graded
    assert time.monotonic() - t0 < 10  # bounded by the soft (1 s) or hard (3 s) timeout, not by sympy
