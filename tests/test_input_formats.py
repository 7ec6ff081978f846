"""Data in the shapes Hugging Face users have: parquet, `datasets` directories, JSON arrays, other field names.

Every format must give the same prepared rows as the jsonl it was converted from, and keep naming
the place of a bad record (FILE:LINE, or FILE:row N for columnar inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_lines

from train.cli import main as cli_main
from train.data.dataset import read_prepared
from train.data.prepare import PrepareOptions, prepare
from train.data.readers import read_test_questions
from train.errors import ConfigError, InputError

# a data set with its own field names, as found on the hub: already graded (a bool column), numeric answers
RECORDS = [
    {"problem": "What is 2+2?", "response": "2+2 is \\boxed{4}", "answer": "4", "correct": True, "topic": "alg"},
    {"problem": "What is 2+2?", "response": "It is \\boxed{5}", "answer": "4", "correct": False, "topic": "alg"},
    {"problem": "Half of 1?", "response": "So \\boxed{\\frac12}", "answer": "0.5", "correct": True, "topic": "num"},
    {"problem": "Half of 1?", "response": "no idea", "answer": "0.5", "correct": False, "topic": "num"},
]
FIELDS = "question=problem,rationale=response,gold=answer,label=correct,subject=topic"


def prepared_rows(out: Path) -> list[tuple]:
    table = read_prepared(out)
    return sorted(zip(*(table.column(c).to_pylist() for c in ("id", "qid", "subject", "question", "rationale",
                                                                 "gold", "label")), strict=True))


def prepare_cli(inputs: list[Path], out: Path, *extra: str) -> int:
    return cli_main(["prepare", "--input", *map(str, inputs), "--output", str(out), "--workers", "1",
                     "--grader", "hendrycks", "--no-progress", *extra])


def prepare_fails(inputs: list[Path], fields: str = FIELDS) -> str:
    with pytest.raises((InputError, ConfigError)) as e:
        prepare(PrepareOptions(inputs=[str(p) for p in inputs], output=str(inputs[0]) + ".out", grader="hendrycks",
                               workers=1, fields=fields, show_progress=False))
    return str(e.value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple]:
    root = tmp_path_factory.mktemp("jsonl")
    write_lines(root / "data.jsonl", RECORDS)
    assert prepare_cli([root / "data.jsonl"], root / "out", "--fields", FIELDS) == 0
    rows = prepared_rows(root / "out")
    assert [r[-1] for r in rows].count("pos") == 2 and {r[2] for r in rows} == {"alg", "num"}
    return rows


def test_parquet_json_array_and_datasets_dir_prepare_like_jsonl(tmp_path, reference):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "data.parquet")
    (tmp_path / "array.json").write_text(json.dumps(RECORDS))
    for i, src in enumerate([tmp_path / "data.parquet", tmp_path / "array.json"]):
        assert prepare_cli([src], tmp_path / f"out{i}", "--fields", FIELDS) == 0
        assert prepared_rows(tmp_path / f"out{i}") == reference, src
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "hfds"))
    assert prepare_cli([tmp_path / "hfds"], tmp_path / "out_ds", "--fields", FIELDS) == 0
    assert prepared_rows(tmp_path / "out_ds") == reference
    # a directory holding a datasets dir and a parquet file reads both (the same records twice: same rows)
    nested = tmp_path / "nested"
    datasets.Dataset.from_list(RECORDS[:2]).save_to_disk(str(nested / "part1"))
    pq.write_table(pa.Table.from_pylist(RECORDS[2:]), nested / "part2.parquet")
    assert prepare_cli([nested], tmp_path / "out_nested", "--fields", FIELDS) == 0
    assert prepared_rows(tmp_path / "out_nested") == reference


def test_columnar_errors_name_the_row_and_the_mapping(tmp_path):
    bad = [dict(r) for r in RECORDS]
    del bad[2]["response"]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")  # the missing value is a null there
    assert prepare_fails([tmp_path / "bad.parquet"]) == \
        f"{tmp_path / 'bad.parquet'}:row 2: null in field 'response' (--fields rationale=response)"
    write_lines(tmp_path / "bad.jsonl", bad)
    assert prepare_fails([tmp_path / "bad.jsonl"]) == \
        f"{tmp_path / 'bad.jsonl'}:3: missing field 'response' (--fields rationale=response)"
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    assert "junk.parquet: cannot read as parquet" in prepare_fails([tmp_path / "junk.parquet"])
    (tmp_path / "bad.json").write_text(json.dumps([RECORDS[0], "not an object"]))
    assert prepare_fails([tmp_path / "bad.json"]).endswith("bad.json:record 2: line is not a JSON object")
    assert prepare_fails([tmp_path / "bad.json"], "answer=gold").startswith("--fields: answer=gold is not")
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    assert "a DatasetDict with splits ['train']: give one split's directory" in prepare_fails([tmp_path / "dd"])
    bad_ds = [dict(r) for r in RECORDS]
    bad_ds[3]["topic"] = 7  # a subject that is not text
    datasets.Dataset.from_list(bad_ds[3:]).save_to_disk(str(tmp_path / "bad_ds"))
    assert prepare_fails([tmp_path / "bad_ds"]) == f"{tmp_path / 'bad_ds'}:row 0: field 'subject' must be str, got int"


def test_eval_reads_test_questions_from_parquet_and_datasets_with_fields(tmp_path):
    rows = [{"prompt": "What is 3*3?", "final": 9, "kind": "arith"}, {"prompt": "1+1?", "final": "2", "kind": "a"}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "t.parquet")
    qs = read_test_questions(tmp_path / "t.parquet", {"question": "prompt", "gold": "final", "subject": "kind"})
    assert [(q.question, q.gold, q.subject, q.source) for q in qs] == \
        [("What is 3*3?", "9", "arith", f"{tmp_path / 't.parquet'}:row 0")]
    with pytest.raises(InputError, match=r"t\.parquet:row 0: test line needs 'problem'"):
        read_test_questions(tmp_path / "t.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": r["prompt"], "final": str(r["final"])} for r in rows]).save_to_disk(
        str(tmp_path / "tds"))
    qs = read_test_questions(tmp_path / "tds", {"question": "prompt", "gold": "final"})
    assert [(q.question, q.gold) for q in qs] == [("What is 3*3?", "9"), ("1+1?", "2")]
