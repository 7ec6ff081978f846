"""`tdg prepare`: read rationales, grade their final answers, write a prepared data set.

Output directory (written to a temporary sibling and renamed into place only when complete):
    data-00000.parquet ...   one row per rationale (see SCHEMA), rows grouped by question
    stats.json               per-subject counts and length percentiles, plus skip counts
    DONE.json                inputs' hashes and the options used (written last)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from train.data.answers import last_boxed
from train.data.dataset import PREPARED_FORMAT, SCHEMA, encode
from train.data.grading import OK, grade_pairs
from train.data.prompt import DEFAULT_TEMPLATE, Prompt, check_template, render_prompt
from train.data.readers import Question, parse_fields, read_inputs
from train.errors import InputError, TdgError
from train.manifest import dir_digest, file_digest, read_done, write_done
from train.models.hub import resolve_model_ref

ROWS_PER_SHARD = 50_000
LENGTH_QUANTILES = (50, 90, 95, 98, 99)
MAX_LEN_CHOICES = (256, 512, 1024, 2048)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class PrepareOptions:
    inputs: list[str]
    output: str
    grader: str = "math-verify"
    workers: int = 2
    on_error: str = "fail"  # fail | skip
    timeout: float = 5.0  # seconds per answer before it counts as ungradable
    tokenizer: str | None = None  # for token-length quantiles and what each max_len keeps; else word/symbol counts
    prompt_template: str = DEFAULT_TEMPLATE  # the template the lengths are measured with (as the stages will use)
    prompt_format: str = "plain"  # plain | chat: as data.prompt_format (chat needs --tokenizer with a chat template)
    system_prompt: str = ""  # as data.system_prompt
    fields: str = ""  # the input's field names: question=problem,rationale=response,gold=answer[,label=correct]
    overwrite: bool = False
    show_progress: bool = True


def _grade(questions: list[Question], opts: PrepareOptions) -> tuple[list[dict], Counter]:
    """The graded rows, and per subject how many rationales were left out as unfinished (cut by the length
    limit of the generation that wrote them: their missing ending is not an error of the teacher's)."""
    rows, pairs, to_grade, unfinished = [], [], [], Counter()
    for q in questions:
        for r in q.rationales:
            if not r.finished:
                unfinished[q.subject] += 1
                continue
            pred = last_boxed(r.text)
            row = {"id": r.id, "qid": q.qid, "subject": q.subject, "level": q.level, "question": q.question,
                   "rationale": r.text, "gold": q.gold, "pred": pred}
            if r.label is not None:
                row.update(label=r.label, status="given")
            elif pred is None:
                row.update(label="neg", status="no_boxed")
            else:
                to_grade.append(len(rows))
                pairs.append((q.gold, pred))
            rows.append(row)
    grades = grade_pairs(pairs, opts.grader, opts.workers, opts.timeout, show_progress=opts.show_progress)
    for i, g in zip(to_grade, grades, strict=True):
        rows[i].update(label="pos" if g.equal else "neg", status="graded" if g.status == OK else g.status)
    return rows, unfinished


def _lengths(rows: list[dict], tokenizer: str | None, prompt: Prompt) -> np.ndarray:
    """Length of each sample as the stages build it (BOS + prompt + rationale + EOS) in tokens of
    `tokenizer`; without one, approximated by words and symbols of the same text."""
    questions, rationales = [r["question"] for r in rows], [r["rationale"] for r in rows]
    if tokenizer is None:
        texts = [render_prompt(prompt.prompt_template, q) + r for q, r in zip(questions, rationales, strict=True)]
        return np.array([len(_WORD.findall(t)) for t in texts])
    from train.data.tokenizer import load_tokenizer

    prompts, targets = encode(load_tokenizer(tokenizer), questions, rationales, prompt)
    return np.array([len(p) + len(t) + 1 for p, t in zip(prompts, targets, strict=True)])


def length_summary(lens: np.ndarray, tokens: bool) -> dict:
    """Quantiles of one group's lengths and, in tokens, the share each max_len keeps (nothing is cut)."""
    if len(lens) == 0:
        return {"samples": 0}
    out = {"samples": len(lens), "mean": round(float(lens.mean()), 1),
           **{f"p{q}": int(np.percentile(lens, q)) for q in LENGTH_QUANTILES}, "max": int(lens.max())}
    if tokens:
        out["keeps"] = {str(m): round(float((lens <= m).mean()), 4) for m in MAX_LEN_CHOICES}
    return out


def compute_stats(rows: list[dict], lengths: np.ndarray, length_unit: str, unfinished: Counter | None = None) -> dict:
    unfinished = unfinished or Counter()
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_subject[r["subject"]].append(i)
    tokens = length_unit == "tokens"
    table = {}
    for subject in [*sorted(by_subject), "ALL"]:
        idx = list(range(len(rows))) if subject == "ALL" else by_subject[subject]
        labels_by_q: dict[str, set] = defaultdict(set)
        status = Counter()
        for i in idx:
            labels_by_q[rows[i]["qid"]].add(rows[i]["label"])
            status[rows[i]["status"]] += 1
        lens = lengths[idx] if idx else np.zeros(1)
        pos = sum(rows[i]["label"] == "pos" for i in idx)
        table[subject] = {
            "questions": len(labels_by_q), "rationales": len(idx), "positives": pos, "negatives": len(idx) - pos,
            "unfinished": sum(unfinished.values()) if subject == "ALL" else unfinished[subject],
            "no_boxed": status["no_boxed"], "ungradable": status["timeout"] + status["error"],
            "q_no_pos": sum("pos" not in s for s in labels_by_q.values()),
            "q_no_neg": sum("neg" not in s for s in labels_by_q.values()),
            "len_p50": int(np.percentile(lens, 50)), "len_p90": int(np.percentile(lens, 90)),
            "len_p99": int(np.percentile(lens, 99)), "len_max": int(lens.max()),
            "lengths": {label: length_summary(np.array([lengths[i] for i in idx if rows[i]["label"] == label],
                                                        dtype=np.int64), tokens)
                        for label in ("pos", "neg")},
        }
    return {"subjects": table, "regime": {"subject": regime_by(rows, "subject"), "level": regime_by(rows, "level")},
            "length_unit": length_unit}


def regime_by(rows: list[dict], field: str) -> dict:
    """The data's regime per value of `field` (and ALL): how often the teacher is right, and how many
    questions have no positive (only negatives to learn from) or no negative (nothing to contrast)."""
    groups: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    counts: Counter = Counter()
    positives: Counter = Counter()
    for r in rows:
        for key in (r[field] or "(none)", "ALL"):
            groups[key][r["qid"]].add(r["label"])
            counts[key] += 1
            positives[key] += r["label"] == "pos"
    out = {}
    for key in [*sorted(k for k in groups if k != "ALL"), "ALL"]:
        qs = groups[key].values()
        out[key] = {"questions": len(qs), "rationales": counts[key],
                    "pos_share": round(positives[key] / counts[key], 4),
                    "q_no_pos_share": round(sum("pos" not in s for s in qs) / len(qs), 4),
                    "q_no_neg_share": round(sum("neg" not in s for s in qs) / len(qs), 4)}
    return out


def format_regime(stats: dict) -> str:
    """The regime table: positive share and questions without a positive / negative, per subject and level."""
    regime = stats.get("regime")
    if not regime:
        return "(no regime table: prepared by an older version; prepare again with --overwrite)"
    rows = [(f"{kind} {k}", v) for kind in ("subject", "level") for k, v in regime[kind].items()
            if k not in ("ALL", "(none)")]
    rows.append(("ALL", regime["subject"]["ALL"]))
    w0 = max(len(name) for name, _ in rows)
    lines = [f"{'regime':<{w0}} {'questions':>9} {'rationales':>10} {'positive':>9} {'q no pos':>9} {'q no neg':>9}"]
    lines += [f"{name:<{w0}} {v['questions']:>9} {v['rationales']:>10} {100 * v['pos_share']:>8.1f}% "
              f"{100 * v['q_no_pos_share']:>8.1f}% {100 * v['q_no_neg_share']:>8.1f}%" for name, v in rows]
    return "\n".join(lines)


def format_stats(stats: dict) -> str:
    cols = ["questions", "rationales", "positives", "negatives", "unfinished", "no_boxed", "ungradable", "q_no_pos",
            "q_no_neg", "len_p50", "len_p90", "len_p99", "len_max"]
    heads = ["subject", "quest", "rats", "pos", "neg", "unfin", "no_box", "ungrad", "q_no_pos", "q_no_neg",
             "p50", "p90", "p99", "max"]
    names = list(stats["subjects"])
    w0 = max(len(n) for n in [*names, "subject"])
    lines = [f"{heads[0]:<{w0}} " + " ".join(f"{h:>8}" for h in heads[1:])]
    for n in names:
        s = stats["subjects"][n]
        lines.append(f"{n:<{w0}} " + " ".join(f"{s.get(c, 0):>8}" for c in cols))
    all_ = stats["subjects"]["ALL"]
    frac = all_["positives"] / max(1, all_["rationales"])
    lines.append(f"positive fraction {frac:.3f}; lengths in {stats['length_unit']}")
    if stats["length_unit"] == "tokens" and "lengths" in all_:
        lines += ["", "sample length in tokens (BOS + prompt + rationale + EOS) and the share each data.max_len "
                  "keeps", f"{'subject':<{w0}} label " + " ".join(f"{'p' + str(q):>6}" for q in LENGTH_QUANTILES)
                  + f" {'max':>6} " + " ".join(f"{'<=' + str(m):>7}" for m in MAX_LEN_CHOICES)]
        for n in names:
            for label, summary in stats["subjects"][n]["lengths"].items():
                if summary["samples"]:
                    lines.append(f"{n:<{w0}} {label:<5} " + " ".join(f"{summary['p' + str(q)]:>6}"
                                                                      for q in LENGTH_QUANTILES)
                                 + f" {summary['max']:>6} " + " ".join(f"{100 * summary['keeps'][str(m)]:>6.1f}%"
                                                                       for m in MAX_LEN_CHOICES))
    if "regime" in stats:
        lines += ["", "the teacher's regime: positive share, and questions without a positive or without a negative",
                  format_regime(stats)]
    if stats.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["skipped"].items())))
    dup = stats.get("duplicates") or {}
    if any(dup.values()):
        lines.append(f"duplicates (kept, counted): {dup['questions']} questions repeated on another line, "
                     f"{dup['rationales']} rationales repeated verbatim for their question")
    return "\n".join(lines)


def _write_shards(rows: list[dict], out: Path) -> list[str]:
    names = []
    for k, start in enumerate(range(0, max(1, len(rows)), ROWS_PER_SHARD)):
        chunk = rows[start:start + ROWS_PER_SHARD]
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        name = f"data-{k:05d}.parquet"
        pq.write_table(table, out / name, row_group_size=4096, compression="zstd")
        names.append(name)
    return names


def prepare(opts: PrepareOptions) -> dict:
    """Run prepare; returns the stats dict. Raises InputError (fail mode) before writing anything."""
    out = Path(opts.output)
    check_template(opts.prompt_template, "--prompt-template")
    if not opts.timeout > 0:
        raise TdgError(f"--timeout must be > 0 seconds, got {opts.timeout}")
    if opts.prompt_format == "chat" and not opts.tokenizer:
        raise TdgError("--prompt-format chat needs --tokenizer: the chat template is the tokenizer's, and the "
                       "lengths prepare reports are the chat-formatted samples' ones")
    if out.exists():
        done = read_done(out)
        if done is not None and done.get("metrics", {}).get("format", 1) < PREPARED_FORMAT:
            print(f"[prepare] {out} was prepared by an older version (labels kept in the text): preparing again",
                  flush=True)
        elif done is not None and not opts.overwrite:
            return {"skipped_existing": True, **json.loads((out / "stats.json").read_text())}
        elif not opts.overwrite:
            raise InputError(str(out), None, "output exists and is not a finished prepare run; "
                             "pass --overwrite to replace it", "output_exists")
    t0 = time.time()
    result = read_inputs(opts.inputs, on_error=opts.on_error, fields=parse_fields(opts.fields))
    if not result.questions:
        raise InputError(", ".join(opts.inputs), None, "no usable records in the input", "empty_input")
    input_files_digest = {str(f): dir_digest(f) if f.is_dir() else file_digest(f) for f in result.files}
    rows, unfinished = _grade(result.questions, opts)
    if not rows:
        raise InputError(", ".join(opts.inputs), None, f"every one of the {sum(unfinished.values())} rationales "
                         "is unfinished (finished: false): sample again with a larger max_new_tokens", "empty_input")
    tokenizer = resolve_model_ref(opts.tokenizer or "", "--tokenizer") or None  # a dir or a cached hub id
    lengths = _lengths(rows, tokenizer, Prompt(opts.prompt_template, opts.prompt_format, opts.system_prompt))
    stats = compute_stats(rows, lengths, "tokens" if opts.tokenizer else "words+symbols (approx. tokens)",
                          unfinished)
    stats["skipped"] = dict(result.skipped)
    stats["seconds"] = round(time.time() - t0, 2)

    stats["duplicates"] = {"questions": result.duplicates["questions"], "rationales": result.duplicates["rationales"]}

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shards = _write_shards(rows, tmp)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        options = {k: v for k, v in vars(opts).items() if k not in ("show_progress", "overwrite")}
        write_done(tmp, stage="prepare", config=options, inputs=input_files_digest,
                   metrics={"format": PREPARED_FORMAT, "shards": shards, **stats["subjects"]["ALL"]})
    except OSError as e:  # a full disk, most often: nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"; {shutil.disk_usage(tmp.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = ""
        raise TdgError(f"{tmp}: cannot write the prepared data ({e.strerror or e}){free}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return stats
