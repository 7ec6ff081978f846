"""Voting over sampled answers: majority, ranker-weighted ASC, fractional ties; eval summaries."""

import math

import pytest

from train.stages.evaluate import markdown_table, summarize
from train.voting import WEIGHTINGS, Candidate, any_correct, vote, weight


def C(answer, correct, score=0.0):
    return Candidate(answer, correct, score)


def test_majority_wins_and_counts_as_correct():
    cands = [C("4", True), C("4", True), C("5", False)]
    assert vote(cands, "count") == 1.0
    assert vote([C("4", False), C("4", False), C("5", True)], "count") == 0.0


def test_tie_between_right_and_wrong_counts_half_and_three_way_a_third():
    assert vote([C("4", True), C("5", False)], "count") == 0.5
    assert vote([C("1", True), C("2", False), C("3", False)], "count") == pytest.approx(1 / 3)


def test_all_wrong_and_no_answers_score_zero():
    assert vote([C("1", False), C("2", False)], "score") == 0.0
    assert vote([C(None, False), C(None, False)], "count") == 0.0
    assert vote([], "count") == 0.0


def test_unanswered_samples_do_not_vote():
    cands = [C(None, False), C(None, False), C(None, False), C("7", True)]
    assert vote(cands, "count") == 1.0


def test_ranker_flips_a_wrong_majority():
    # three confident-looking but low-scored wrong votes against two highly scored right ones
    cands = [C("10", False, -3.0)] * 3 + [C("12", True, 4.0)] * 2
    assert vote(cands, "count") == 0.0
    assert vote(cands, "score") == 1.0  # 3 * sigmoid(-3) = 0.14 < 2 * sigmoid(4) = 1.96
    assert vote(cands, "1+score") == 1.0  # 3.14 < 3.96
    assert vote(cands, "1+2score") == 1.0


def test_one_plus_score_keeps_a_clear_majority():
    cands = [C("10", True, -1.0)] * 4 + [C("12", False, 4.0)]
    assert vote(cands, "score") == 1.0 and vote(cands, "1+score") == 1.0


def test_equivalent_spellings_vote_together():
    cands = [C("\\frac{1}{2}", True), C("\\frac12", True), C("3", False), C("4", False)]
    assert vote(cands, "count") == 1.0


def test_weights_and_unknown_weighting():
    assert weight("count", 5.0) == 1.0
    assert weight("score", 0.0) == 0.5
    assert weight("1+2score", 0.0) == 2.0
    assert math.isclose(weight("1+score", 100.0), 2.0)
    with pytest.raises(ValueError, match="unknown weighting"):
        weight("softmax", 0.0)
    assert len(WEIGHTINGS) == 4


def test_pass_at_n():
    assert any_correct([C("1", False), C("2", True)]) == 1.0 and any_correct([C("1", False)]) == 0.0


def _record(subject, level, greedy, votes, finished=(True, True)):
    return {"subject": subject, "level": level, "greedy": {"correct": greedy}, "votes": votes,
            "samples": [{"finished": f} for f in finished]}


def test_summary_per_subject_and_level_and_table():
    recs = [_record("algebra", "Level 1", True, {"sc": 1.0, "pass_at_n": 1.0, "asc_score": 1.0}),
            _record("algebra", "Level 2", False, {"sc": 0.5, "pass_at_n": 1.0, "asc_score": 0.0}),
            _record("geometry", "Level 1", False, {"sc": 0.0, "pass_at_n": 0.0, "asc_score": 0.0}, (False, True))]
    m = summarize(recs)
    assert m["overall"]["unfinished"] == pytest.approx(100 / 6) and m["by_subject"]["algebra"]["unfinished"] == 0
    assert m["overall"]["questions"] == 3
    assert m["overall"]["greedy"] == pytest.approx(100 / 3)
    assert m["overall"]["sc"] == pytest.approx(50.0)
    assert m["by_subject"]["algebra"]["sc"] == pytest.approx(75.0)
    assert m["by_level"]["Level 1"]["asc_score"] == pytest.approx(50.0)
    table = markdown_table(m, 16, "score")
    assert "| **all** | 3 | 33.3 | 50.0 | 33.3 | 66.7 |" in table
    assert "subject geometry" in table and "level Level 2" in table
