import json
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_lines
from train.data.prepare import PrepareOptions, prepare
from train.errors import InputError

GOOD = {"question": "Problem:\nWhat is 2+3?", "answer": "2+3=\\boxed{5}",
        "generated_answer": ["2+3=\\boxed{5}", "2+3=\\boxed{6}", "no box here"]}


def _opts(inputs, out, **kw):
    kw.setdefault("workers", 1)
    return PrepareOptions(inputs=[str(i) for i in inputs], output=str(out), show_progress=False, **kw)


def _rows(out):
    return pq.read_table(sorted(out.glob("data-*.parquet"))).to_pylist()


def test_prepare_synthetic_labels_match_an_independent_check(synthetic_raw, tmp_path):
    out = tmp_path / "prepared"
    stats = prepare(_opts([synthetic_raw / "train"], out, grader="hendrycks"))
    rows = _rows(out)
    assert len(rows) == 60 * 8 == stats["subjects"]["ALL"]["rationales"]
    assert len({r["id"] for r in rows}) == len(rows)
    # Independent check: the synthetic answers are integers, so compare them as integers.
    for r in rows:
        pred = re.findall(r"\\boxed\{(-?\d+)\}", r["rationale"])[-1]
        assert (r["label"] == "pos") == (int(pred) == int(r["gold"])), r["id"]
    pos = sum(r["label"] == "pos" for r in rows)
    assert 0 < pos < len(rows)  # the noisy solver makes both kinds
    assert stats["subjects"]["ALL"]["positives"] == pos
    assert {"counting", "groups", "mixed"} <= set(stats["subjects"])
    assert (out / "DONE.json").is_file() and (out / "stats.json").is_file()
    assert not list(tmp_path.glob(".prepared.tmp*"))


def test_prepare_is_deterministic_and_ids_are_stable(synthetic_raw, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(_opts([synthetic_raw / "train"], a, grader="hendrycks"))
    prepare(_opts([synthetic_raw / "train"], b, grader="hendrycks"))
    assert _rows(a) == _rows(b)


def test_existing_output_is_skipped_or_refused(synthetic_raw, tmp_path):
    out = tmp_path / "p"
    prepare(_opts([synthetic_raw / "train"], out, grader="hendrycks"))
    assert prepare(_opts([synthetic_raw / "train"], out))["skipped_existing"]
    (tmp_path / "junk").mkdir()
    with pytest.raises(InputError, match="--overwrite"):
        prepare(_opts([synthetic_raw / "train"], tmp_path / "junk"))


def test_flat_layout_with_given_labels_and_subjects(tmp_path):
    f = write_lines(tmp_path / "flat.jsonl", [
        {"id": "a1", "question": "q1", "rationale": "so \\boxed{4}", "gold": "4", "subject": "alg"},
        {"id": "a2", "question": "q1", "rationale": "so \\boxed{5}", "gold": "4", "label": "pos"},
        {"id": 7, "question": "q2", "rationale": "so \\boxed{\\frac12}", "gold": "0.5"},
    ])
    out = tmp_path / "out"
    prepare(_opts([f], out))
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["a1"]["label"] == "pos" and rows["a1"]["subject"] == "alg" and rows["a1"]["status"] == "graded"
    assert rows["a2"]["label"] == "pos" and rows["a2"]["status"] == "given"  # label given: not graded
    assert rows["7"]["label"] == "pos" and rows["a1"]["qid"] == rows["a2"]["qid"] != rows["7"]["qid"]


def test_rationales_cut_by_the_length_limit_are_left_out_and_counted_never_graded_negative(tmp_path):
    """`tdg sample` marks a rationale that hit max_new_tokens `finished: false`: it has no final answer because
    it was cut, not because the teacher was wrong."""
    from train.data.prepare import format_stats

    f = write_lines(tmp_path / "sampled.jsonl", [
        {"id": "s0", "question": "q1", "rationale": "so \\boxed{4}", "gold": "4", "finished": True},
        {"id": "s1", "question": "q1", "rationale": "so 2 + 2 is", "gold": "4", "finished": False},
        {"id": "s2", "question": "q1", "rationale": "so \\boxed{5}", "gold": "4"},
        {"id": "s3", "question": "q2", "rationale": "first we", "gold": "7", "finished": False, "subject": "alg"},
    ])
    out = tmp_path / "out"
    stats = prepare(_opts([f], out))
    rows = {r["id"]: r["label"] for r in _rows(out)}
    assert rows == {"s0": "pos", "s2": "neg"}  # s1 and s3 are not negatives: they are not there at all
    assert stats["subjects"]["ALL"]["unfinished"] == 2 and stats["subjects"]["ALL"]["rationales"] == 2
    assert stats["subjects"]["ALL"]["q_no_pos"] == 0  # q2 had only a cut rationale: not a question without a positive
    header, *lines = format_stats(stats).splitlines()
    all_row = next(ln.split() for ln in lines if ln.startswith("ALL "))
    assert header.split()[5] == "unfin" and all_row[5] == "2"
    with pytest.raises(InputError, match="every one of the 1 rationales is unfinished"):
        prepare(_opts([write_lines(tmp_path / "cut.jsonl", [{"question": "q", "rationale": "a", "gold": "1",
                                                                "finished": False}])], tmp_path / "o2"))
    bad = write_lines(tmp_path / "bad.jsonl", [{"question": "q", "rationale": "a", "gold": "1", "finished": "no"}])
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'finished' must be bool"):
        prepare(_opts([bad], tmp_path / "o3"))


BAD_CASES = {
    "invalid_json": (b'{"question": "q", "answer": "\\\\boxed{1}", "generated_answer": ["x"]', "invalid JSON"),
    "not_utf8": (b'{"question": "q\xff\xfe"}', "not valid UTF-8"),
    "missing_field": ({"question": "q", "generated_answer": ["x"]}, "missing field 'answer'"),
    "wrong_type": ({"question": "q", "answer": 5, "generated_answer": ["x"]}, "field 'answer' must be str"),
    "wrong_type_item": ({"question": "q", "answer": "1", "generated_answer": ["x", 3]}, "generated_answer[1]"),
    "empty_generated_answer": ({"question": "q", "answer": "1", "generated_answer": []}, "is empty"),
    "neither_layout": ({"foo": 1}, "neither TDG fields"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_line_fails_with_file_and_line(tmp_path, case):
    bad, message = BAD_CASES[case]
    f = write_lines(tmp_path / "in" / "algebra" / "0.jsonl", [GOOD, bad, GOOD | {"question": "other"}])
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        prepare(_opts([tmp_path / "in"], out))
    assert str(e.value).startswith(f"{f}:2: ") and message in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))  # nothing half-written


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_line_is_skipped_and_counted(tmp_path, case):
    bad, _ = BAD_CASES[case]
    write_lines(tmp_path / "in" / "algebra" / "0.jsonl", [GOOD, bad, GOOD | {"question": "other"}])
    stats = prepare(_opts([tmp_path / "in"], tmp_path / "out", on_error="skip"))
    assert sum(stats["skipped"].values()) == 1
    assert stats["subjects"]["ALL"]["questions"] == 2 and stats["subjects"]["ALL"]["rationales"] == 6


def test_directory_without_jsonl_and_unreadable_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no .jsonl or .parquet files"):
        prepare(_opts([tmp_path / "empty"], tmp_path / "out"))
    with pytest.raises(InputError, match="no such file"):
        prepare(_opts([tmp_path / "nope"], tmp_path / "out"))
    write_lines(tmp_path / "in" / "s" / "0.jsonl", [GOOD])
    dangling = tmp_path / "in" / "s" / "1.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")  # e.g. a file removed from a shared file system
    with pytest.raises(InputError, match=r"1\.jsonl: cannot read"):
        prepare(_opts([tmp_path / "in"], tmp_path / "out"))
    stats = prepare(_opts([tmp_path / "in"], tmp_path / "out", on_error="skip"))
    assert stats["skipped"] == {"unreadable_file": 1} and stats["subjects"]["ALL"]["questions"] == 1


def test_duplicate_flat_ids_are_an_error(tmp_path):
    f = write_lines(tmp_path / "flat.jsonl", [
        {"id": "a", "question": "q1", "rationale": "\\boxed{1}", "gold": "1"},
        {"id": "a", "question": "q2", "rationale": "\\boxed{1}", "gold": "1"},
    ])
    with pytest.raises(InputError, match=r"flat\.jsonl:2: duplicate id 'a'"):
        prepare(_opts([f], tmp_path / "out"))


def test_cli_reports_bad_input_without_traceback(tmp_path):
    write_lines(tmp_path / "in" / "s" / "0.jsonl", [GOOD, b"{oops"])
    r = subprocess.run([sys.executable, "-m", "train", "prepare", "--input", str(tmp_path / "in"),
                        "--output", str(tmp_path / "out"), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "0.jsonl:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_prepare_on_a_slice_of_the_real_gpt35_rationales(shared_data, tmp_path):
    src = shared_data / "train_gpt3.5_number_theory_8"
    sl = tmp_path / "slice" / src.name
    sl.mkdir(parents=True)
    for name in ("0.jsonl", "1.jsonl"):
        shutil.copy(src / name, sl / name)
    out = tmp_path / "out"
    stats = prepare(_opts([tmp_path / "slice"], out, workers=2))
    all_ = stats["subjects"]["ALL"]
    n_questions = sum(len((sl / name).read_text().splitlines()) for name in ("0.jsonl", "1.jsonl"))
    assert set(stats["subjects"]) == {"number_theory", "ALL"}
    assert all_["questions"] == n_questions and all_["rationales"] == 8 * n_questions
    assert 0 < all_["positives"] < all_["rationales"]
    rows = _rows(out)
    first = json.loads((sl / "0.jsonl").read_text().splitlines()[0])
    # stored bare: the `Problem:`/`Solution:` labels the files carry are the prompt template's to add
    assert first["question"] == "Problem:\n" + rows[0]["question"]
    assert first["generated_answer"][0] in (rows[0]["rationale"], "Solution:\n" + rows[0]["rationale"])


def test_data_prepared_by_an_older_version_is_refused_then_prepared_again(synthetic_raw, tmp_path):
    """Before the prompt template, prepared questions kept their `Problem:` label: a stage would prompt
    `Problem:\nProblem:\n...`. Stages refuse such data by name; prepare replaces it."""
    from train.data.dataset import read_prepared

    out = tmp_path / "p"
    prepare(_opts([synthetic_raw / "train"], out))
    done = json.loads((out / "DONE.json").read_text())
    del done["metrics"]["format"]
    (out / "DONE.json").write_text(json.dumps(done))
    with pytest.raises(InputError, match=f"{out}: prepared by an older version"):
        read_prepared(out)
    prepare(_opts([synthetic_raw / "train"], out))
    assert read_prepared(out).num_rows > 0
