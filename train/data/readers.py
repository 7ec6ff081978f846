"""Readers for the two input layouts; every problem is reported as `FILE:LINE: what is wrong`.

Files: `.jsonl`, `.json` (an array of objects, or JSON lines), `.parquet`, and Hugging Face `datasets`
directories written by `save_to_disk` (read as the Arrow files they are; a DatasetDict asks for
one split). In parquet and datasets inputs the place of a problem is `FILE:row N` (0-based, as
`dataset[N]`). Field names other than the ones below are mapped with `--fields`
(`question=problem,rationale=response,gold=answer,label=correct`).

TDG layout: `<root>/<subject>/*.jsonl`, each line `{"question", "answer", "generated_answer": [...]}`
where `answer` is a worked solution whose last `\\boxed{}` is the gold answer.
Flat layout: records `{"question", "rationale", "gold"}` with optional `"id"`, `"subject"`, `"level"`
and optional `"label"` (`pos`/`neg`/bool) that, when present, is used instead of grading, and
`"finished"` (bool, as `tdg sample` writes it): a rationale cut by the length limit is left out, never
graded negative.

Each input line's layout is recognised by its fields, so a directory may mix both. A leading
`Problem:` label on questions and `Solution:` label on rationales is stripped (the TDG files carry
them, MATH files do not): the prompt template adds them back, once (`train.data.prompt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from train.data.answers import last_boxed
from train.data.prompt import bare_question, bare_rationale
from train.errors import InputError

Where = tuple[str, "int | str"]  # (file, line number, or "row N" / "record N")
_SUBJECT_DIR = re.compile(r"^(?:train|test|val)_[^_]+_(.+)_\d+$")


@dataclass
class Rationale:
    id: str
    text: str
    label: str | None = None  # "pos"/"neg" when the input gave it; None means grade it
    finished: bool = True  # false: generation hit its length limit before the end (`tdg sample`'s field)


@dataclass
class Question:
    qid: str
    subject: str
    question: str
    gold: str
    source: str  # FILE:LINE
    rationales: list[Rationale] = field(default_factory=list)
    level: str = ""
    grouped: bool = False  # one record carried all its rationales (TDG): seeing the question again is a repeat


def question_id(question: str) -> str:
    """Stable id of a question: a hash of its text, so reruns and reorderings keep ids."""
    return hashlib.sha1(question.encode("utf-8")).hexdigest()[:16]


def subject_from_dir(name: str) -> str:
    """`train_gpt3.5_algebra_8` -> `algebra`; any other directory name is used as it is."""
    m = _SUBJECT_DIR.match(name)
    return m.group(1) if m else name


def gold_answer(answer: str) -> str:
    """The gold final answer of a worked solution: its last boxed expression, else the whole text."""
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def _gold(answer: str, where: Where) -> str:
    """The gold answer of a worked solution; a `\\boxed{` that never closes is an error, not the whole text."""
    if last_boxed(answer) is None and ("\\boxed" in answer or "\\fbox" in answer):
        raise InputError(where[0], where[1], "the gold answer has a \\boxed{ that never closes", "bad_gold")
    return gold_answer(answer)


def _check_text(rec: dict, where: Where) -> None:
    """Every string of a record must be valid Unicode: JSON can carry lone surrogates (\\ud800) that no file
    format can write."""
    for key, value in rec.items():
        for i, text in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    field = f"{key}[{i}]" if isinstance(value, list) else key
                    raise InputError(where[0], where[1], f"field {field!r} holds a lone surrogate "
                                     f"({text[e.start]!r} at {e.start}): not valid Unicode", "not_unicode") from None


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.as_posix())]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
FIELD_NAMES = ("id", "question", "rationale", "gold", "label", "subject", "level", "finished")  # --fields targets
_OPTIONAL_FIELDS = {"id", "label", "subject", "level", "finished"}


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def find_inputs(path: Path) -> list[Path]:
    """The data files under `path` (itself if a file or a datasets directory), in natural order (2.jsonl
    before 10.jsonl): .jsonl and .parquet files, and datasets directories."""
    if path.is_file() or (path.is_dir() and is_datasets_dir(path)):
        return [path]
    if not path.exists():
        raise InputError(str(path), None, "no such file or directory", "unreadable_file")
    found = {d.parent for d in path.rglob("state.json")} | {d.parent for d in path.rglob("dataset_dict.json")}
    files = [p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet") and not p.is_dir()
             and not any(d in p.parents for d in found)]
    files = sorted([*files, *found], key=_natural_key)
    if not files:
        raise InputError(str(path), None, "directory contains no .jsonl or .parquet files or datasets directories",
                         "no_jsonl_files")
    return files


def parse_fields(spec: str | dict[str, str] | None, key: str = "--fields") -> dict[str, str]:
    """`question=problem,rationale=response` -> {"question": "problem", "rationale": "response"}: our field
    name -> the input's."""
    from train.errors import ConfigError

    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (item.partition("=")[::2] for item in spec.split(","))
    out: dict[str, str] = {}
    for ours, theirs in pairs:
        ours, theirs = ours.strip(), theirs.strip()
        if ours not in FIELD_NAMES or not theirs:
            raise ConfigError(f"{key}: {ours}={theirs} is not FIELD=INPUT_FIELD with FIELD one of "
                              f"{', '.join(FIELD_NAMES)} (e.g. question=problem,rationale=response,gold=answer)")
        if ours in out:
            raise ConfigError(f"{key}: {ours} is given twice ({ours}={out[ours]} and {ours}={theirs}); give each "
                              "field once")
        out[ours] = theirs
    return out


def rename_fields(rec: object, fields: dict[str, str], where: Where) -> object:
    """The record with the input's field names replaced by ours (`--fields`)."""
    if not fields or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in fields.values()}
    for ours, theirs in fields.items():
        if rec.get(theirs) is not None:
            out[ours] = rec[theirs]
        elif ours not in _OPTIONAL_FIELDS:  # columnar files hold a missing value as null
            what = "missing field" if theirs not in rec else "null in field"
            raise InputError(where[0], where[1], f"{what} {theirs!r} (--fields {ours}={theirs})", "missing_field")
    return out


def _need(rec: dict, key: str, types: type | tuple, where: Where) -> object:
    if key not in rec:
        raise InputError(where[0], where[1], f"missing field {key!r}", "missing_field")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool) and types is not bool:
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise InputError(
            where[0], where[1], f"field {key!r} must be {names}, got {type(value).__name__}", "wrong_type"
        )
    return value


def _parse_label(value: object, where: Where) -> str:
    if value is True or value in ("pos", "positive", 1):
        return "pos"
    if value is False or value in ("neg", "negative", 0):
        return "neg"
    raise InputError(where[0], where[1], f"field 'label' must be pos/neg or a bool, got {value!r}", "wrong_type")


def _parse_line(rec: object, subject: str, where: Where) -> Question:
    if not isinstance(rec, dict):
        raise InputError(where[0], where[1], "line is not a JSON object", "wrong_type")
    _check_text(rec, where)
    source = f"{where[0]}:{where[1]}"
    level = str(rec.get("level", ""))
    if "generated_answer" in rec:
        question = bare_question(_need(rec, "question", str, where))
        answer = _need(rec, "answer", str, where)
        generated = _need(rec, "generated_answer", list, where)
        if not generated:
            raise InputError(where[0], where[1], "field 'generated_answer' is empty", "empty_generated_answer")
        for i, r in enumerate(generated):
            if not isinstance(r, str):
                raise InputError(
                    where[0], where[1], f"generated_answer[{i}] must be str, got {type(r).__name__}", "wrong_type"
                )
        q = Question(question_id(question), str(rec.get("subject", subject)), question, _gold(answer, where),
                     source, level=level)
        q.rationales = [Rationale("", bare_rationale(r)) for r in generated]
        q.grouped = True
        return q
    if "rationale" in rec:
        rid = _need(rec, "id", (str, int), where) if rec.get("id") is not None else ""
        question = bare_question(_need(rec, "question", str, where))
        rationale = bare_rationale(_need(rec, "rationale", str, where))
        gold = str(_need(rec, "gold", (str, int, float), where))
        subj = _need(rec, "subject", str, where) if "subject" in rec else subject
        label = _parse_label(rec["label"], where) if "label" in rec else None
        finished = _need(rec, "finished", bool, where) if rec.get("finished") is not None else True
        q = Question(question_id(question), subj, question, _gold(gold, where), source, level=level)
        q.rationales = [Rationale(str(rid), rationale, label, finished)]  # no id: numbered per question, as TDG
        return q
    raise InputError(
        where[0], where[1],
        "line has neither TDG fields (question, answer, generated_answer) "
        "nor flat fields (question, rationale, gold); map other names with --fields",
        "missing_field",
    )


def _parse_test_line(rec: object, subject: str, where: Where, need_gold: bool = True) -> Question:
    """A test question: MATH style (problem + solution, subject or type, level), question + answer
    (answer may be a worked solution: its last boxed expression is the gold), or a TDG line."""
    if not isinstance(rec, dict):
        raise InputError(where[0], where[1], "line is not a JSON object", "wrong_type")
    _check_text(rec, where)
    if "problem" in rec:
        question, gold_keys = _need(rec, "problem", str, where), ("solution", "answer")
    elif "question" in rec:
        question, gold_keys = _need(rec, "question", str, where), ("answer", "gold")
    else:
        raise InputError(where[0], where[1], "test line needs 'problem' (MATH style) or 'question'", "missing_field")
    gold_key = next((k for k in gold_keys if k in rec), None)
    if gold_key is None and need_gold:
        raise InputError(where[0], where[1], f"missing field {gold_keys[0]!r} (or {gold_keys[1]!r})", "missing_field")
    gold = _need(rec, gold_key, (str, int, float), where) if gold_key is not None else ""
    subj = rec.get("subject", rec.get("type", subject))
    if not isinstance(subj, str):
        raise InputError(where[0], where[1], f"field 'subject' must be str, got {type(subj).__name__}", "wrong_type")
    question = bare_question(question)
    return Question(question_id(question), subj, question, _gold(str(gold), where) if gold_key else "",
                    f"{where[0]}:{where[1]}",
                    level=str(rec.get("level", "")))


def report_repeats(stage: str, repeats: Counter) -> None:
    """Say that repeated questions were merged, each asked once (from the first rank only)."""
    if repeats["questions"] and os.environ.get("RANK", "0") == "0":
        print(f"[{stage}] {repeats['questions']} line(s) repeat a question an earlier line asked: merged, each "
              "question is asked once", flush=True)


def read_test_questions(path: str | Path, fields: dict[str, str] | None = None, need_gold: bool = True,
                        repeats: Counter | None = None) -> list[Question]:
    """Every question of a test file or directory (first occurrence of each), in file order.
    A directory's subdirectory names are subjects (the TDG layout); bad lines raise InputError.
    need_gold=False (tdg sample): a question without a gold answer has gold ''. `repeats` counts the lines
    whose question an earlier line already asked (merged into it), under "questions"."""
    import functools

    root = Path(path)
    seen: dict[str, Question] = {}
    for f in find_inputs(root):
        subject = subject_from_dir(f.parent.name) if root.is_dir() and f != root else "default"
        for q in _read_file(f, subject, functools.partial(_parse_test_line, need_gold=need_gold), fields):
            if isinstance(q, InputError):
                raise q
            if repeats is not None and q.qid in seen:
                repeats["questions"] += 1
            seen.setdefault(q.qid, q)
    if not seen:
        raise InputError(str(root), None, "no test questions", "empty_input")
    return list(seen.values())


def _read_file(path: Path, subject: str, parse=None, fields: dict[str, str] | None = None
               ) -> Iterator[Question | InputError]:
    """Each record of a data file as a Question, or the InputError that says what is wrong with it."""
    parse = parse or _parse_line
    for where, rec in _records(path):
        if isinstance(rec, InputError):
            yield rec
            continue
        try:
            yield parse(rename_fields(rec, fields or {}, where), subject, where)
        except InputError as e:
            yield e


def _records(path: Path) -> Iterator[tuple[Where, object]]:
    """((file, line or "row N"), record or InputError) for every record of one input."""
    if path.is_dir():
        yield from _arrow_rows(path, _datasets_table(path))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(str(path), None, f"cannot read as parquet: {e}", "unreadable_file") from None
        yield from _arrow_rows(path, table)
    else:
        yield from _json_records(path)


def _datasets_table(path: Path):
    """The rows of a `save_to_disk` directory, read from its Arrow files (no `datasets` import needed)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise InputError(str(path), None, f"a DatasetDict with splits {splits}: give one split's directory "
                         f"(e.g. {path / (splits[0] if splits else 'train')})", "unreadable_file")
    try:
        state = json.loads((path / "state.json").read_text())
        tables = []
        for entry in state["_data_files"]:
            with pa.memory_map(str(path / entry["filename"])) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(str(path), None, f"cannot read as a datasets directory (state.json + Arrow files): {e}",
                         "unreadable_file") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _arrow_rows(path: Path, table) -> Iterator[tuple[Where, object]]:
    row = 0
    for batch in table.to_batches(max_chunksize=4096):
        for rec in batch.to_pylist():
            yield (str(path), f"row {row}"), rec
            row += 1


def _json_records(path: Path) -> Iterator[tuple[Where, object]]:
    """JSON lines, or a `.json` file holding one array of objects (its records are numbered from 1)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(str(path), None, f"cannot read: {e.strerror}", "unreadable_file") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    if path.suffix == ".json" and data.lstrip().startswith(b"["):
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(str(path), None, f"not valid UTF-8 (byte {e.start})", "not_utf8") from None
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise InputError(str(path), getattr(e, "lineno", None), f"invalid JSON: {getattr(e, 'msg', e)}",
                             "invalid_json") from None
        for i, rec in enumerate(records, start=1):
            yield (str(path), f"record {i}"), rec
        return
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (str(path), lineno), InputError(str(path), lineno, f"not valid UTF-8 (byte {e.start})", "not_utf8")
            continue
        try:
            yield (str(path), lineno), json.loads(text)
        except json.JSONDecodeError as e:
            yield (str(path), lineno), InputError(str(path), lineno, f"invalid JSON: {e.msg} at column {e.colno}",
                                                  "invalid_json")
        except RecursionError:
            yield (str(path), lineno), InputError(str(path), lineno, "invalid JSON: nested too deeply",
                                                  "invalid_json")
        except ValueError as e:  # e.g. an integer longer than Python converts (4,300 digits)
            yield (str(path), lineno), InputError(str(path), lineno, f"invalid JSON: {e}", "invalid_json")


@dataclass
class ReadResult:
    questions: list[Question]
    skipped: Counter  # reason -> count (only with on_error="skip")
    files: list[Path]
    duplicates: Counter = field(default_factory=Counter)  # "questions" seen again, "rationales" repeated verbatim


def read_inputs(paths: list[str | Path], on_error: str = "fail", fields: dict[str, str] | None = None) -> ReadResult:
    """Read every input; merge rationales of the same question; give rationales stable ids.

    on_error="fail" raises the first InputError; "skip" drops the bad line or file and counts it.
    """
    by_qid: dict[str, Question] = {}
    skipped: Counter = Counter()
    duplicates: Counter = Counter()
    texts: dict[str, set[str]] = {}  # qid -> rationale texts seen
    files_read: list[Path] = []
    seen_ids: dict[str, str] = {}

    def fail_or_skip(err: InputError) -> None:
        if on_error == "fail":
            raise err
        skipped[err.reason] += 1

    for root in map(Path, paths):
        try:
            files = find_inputs(root)
        except InputError as e:
            fail_or_skip(e)
            continue
        for f in files:
            subject = subject_from_dir(f.parent.name) if root.is_dir() and f != root else "default"
            try:
                items = list(_read_file(f, subject, fields=fields))
            except InputError as e:
                fail_or_skip(e)
                continue
            files_read.append(f)
            for q in items:
                if isinstance(q, InputError):
                    fail_or_skip(q)
                    continue
                if q.qid in by_qid and q.grouped:  # a TDG line repeats a question (flat lines share one)
                    duplicates["questions"] += 1
                merged = by_qid.setdefault(q.qid, Question(q.qid, q.subject, q.question, q.gold, q.source,
                                                           level=q.level))
                seen_texts = texts.setdefault(q.qid, set())
                for r in q.rationales:
                    duplicates["rationales"] += r.text in seen_texts
                    seen_texts.add(r.text)
                    r.id = r.id or f"{q.qid}-{len(merged.rationales)}"
                    if r.id in seen_ids:
                        path, line = q.source.rsplit(":", 1)
                        fail_or_skip(InputError(path, int(line) if line.isdigit() else line,
                                                f"duplicate id {r.id!r} (first at {seen_ids[r.id]})",
                                                "duplicate_id"))
                        continue
                    seen_ids[r.id] = q.source
                    merged.rationales.append(r)
    return ReadResult(list(by_qid.values()), skipped, files_read, duplicates)
