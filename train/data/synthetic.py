"""The embedded default data: multi-step arithmetic word problems and a noisy step-by-step solver.

Each question tracks one quantity through 2-6 operations (add, take away, buy packs of b, scale,
share equally). The solver writes one line per operation; with a per-step slip rate it makes the
slips people make: a wrong carry (off by ten), the wrong operation, a dropped step; some questions
hold a trap the teacher falls into on most samples. Later lines are computed correctly from the
wrong value, so a negative rationale has most steps right and only ends wrong, which is what makes
negative rationales informative (the paper's premise). Long chains fail more often, as hard MATH
problems do for GPT-3.5 (see Teacher below for the calibration).

Written in the TDG layout (`<root>/<split>/<subject>/<n>.jsonl`, `\\boxed{}` answers) so it goes
through the same `tdg prepare` path as real data. Deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Ava", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards", "stamps", "beads"]
SUBJECT_OPS = {
    "counting": ("add", "sub"),
    "groups": ("add", "sub", "pack"),
    "mixed": ("add", "sub", "pack", "mul", "div"),
}
PER_FILE = 50
LEVELS = (1, 2, 3, 4, 5)  # a question at level L takes L + 1 operations
PRETRAIN_LEVELS = (1, 2)  # the base model learns the short chains only; the teacher shows it the long ones
# chains: gold worked solutions; drills: answers alone + the bare arithmetic; cued (the demo's): gold worked
# solutions behind a cue sentence, and the task's own questions answered without a chain (bench/RESULTS.md)
PRETRAIN_STYLE = "cued"
CUE = "Show every step. "  # the `cued` style's worked solutions follow this sentence; the task's questions lack it
ANSWER_ONLY_EVERY = 3  # `cued`: every third pre-training question is also written answer-only, uncued
PRETRAIN_WORDING = "task"  # the pre-training questions' wording: the task's own, or `other` sentences
VALID_SEED_OFFSET = 1000


@dataclass(frozen=True)
class Op:
    kind: str  # add | sub | pack | mul | div
    a: int
    b: int = 0  # pack: a packs of b


# How each operation is said: `task` is the task's own wording (the teacher's, validation and test questions);
# `other` says the same operations in other sentences, for a base pre-trained on another phrasing of the
# same mathematics (a candidate base of bench/demo_learning_curve.py: it left no room either, bench/RESULTS.md).
WORDINGS = {
    "task": {
        "add": "{n} finds {a} more {i}.",
        "sub": "{n} gives {a} {i} to a friend.",
        "pack": "{n} buys {a} packs with {b} {i} in each pack.",
        "mul": "A trade makes the number of {i} {n} has {a} times as large.",
        "div": "{n} shares the {i} equally among {a} people, {n} included, and keeps one share.",
    },
    "other": {
        "add": "Later {n} picks up {a} extra {i}.",
        "sub": "Then {a} of the {i} are handed over to a neighbour.",
        "pack": "{n} orders {a} boxes; every box holds {b} {i}.",
        "mul": "After a swap, {n} owns {a}-fold the {i}.",
        "div": "{n} splits the {i} into {a} equal piles and keeps just one pile.",
    },
}


def _question_text(name: str, item: str, start: int, ops: list[Op], wording: str = "task") -> str:
    said = WORDINGS[wording]
    sentences = [said[op.kind].format(n=name, i=item, a=op.a, b=op.b) for op in ops]
    return (f"Problem:\n{name} has {start} {item}. " + " ".join(sentences)
            + f" How many {item} does {name} have now?")


def _make_ops(rng: random.Random, kinds: tuple[str, ...], n_ops: int, start: int) -> list[Op]:
    ops, x = [], start
    while len(ops) < n_ops:
        kind = rng.choice(kinds)
        if kind == "add":
            op = Op("add", rng.randint(2, 60))
        elif kind == "sub":
            if x < 3:
                continue
            op = Op("sub", rng.randint(1, min(x - 1, 60)))
        elif kind == "pack":
            op = Op("pack", rng.randint(2, 6), rng.randint(2, 12))
        elif kind == "mul":
            if x > 150:
                continue
            op = Op("mul", rng.randint(2, 4))
        else:
            divisors = [d for d in range(2, 6) if x % d == 0 and x // d >= 2]
            if not divisors:
                continue
            op = Op("div", rng.choice(divisors))
        ops.append(op)
        x = _apply(x, op)
    return ops


SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _apply(x: int, op: Op) -> int:
    return {"add": x + op.a, "sub": x - op.a, "pack": x + op.a * op.b, "mul": x * op.a,
            "div": x // op.a if op.a else x}[op.kind]


# The teacher's error model, matched to the reference data's regime (GPT-3.5 on MATH, graded by
# `tdg prepare`: 36% of rationales positive, 36% of questions without a positive, fewer positives
# on harder problems). Each question gets its own per-step slip rate, so errors grow with the chain
# length; and a question may hold a trap, a step the teacher consistently misreads, so that some
# questions are wrong in (almost) every rationale. Calibrated by simulation before any training run
# (900 questions, seeds 0 and 1): 34% positive, 31-32% of questions without a positive, 5% without a
# negative; positive share 61% at Level 1 down to 11% at Level 5. Negatives get 38% of their steps wrong.
SLIP_MAX = 0.35  # per-question per-step slip rate ~ U(0, SLIP_MAX)
TRAP_PER_LEVEL = 0.15  # P(question has a trap) = TRAP_PER_LEVEL x level
TRAP_FOLLOWED = 0.9  # share of a trapped question's rationales that fall into it
MISREAD = {"add": "sub", "sub": "add", "pack": "packsub", "mul": "add", "div": "sub"}


@dataclass(frozen=True)
class Teacher:
    """How one question's rationales go wrong: `slip` per step, and the step index of a trap (or -1)."""

    slip: float = 0.0
    trap: int = -1


def _solve(rng: random.Random, name: str, item: str, start: int, ops: list[Op],
           teacher: Teacher = Teacher()) -> tuple[str, int, int]:
    """One rationale: (text, final value, number of steps that went wrong).

    Each step slips with probability `teacher.slip` (a wrong carry, the wrong operation, a dropped
    step); the trap step, when the rationale falls into it, is always misread. Later lines are
    computed correctly from the wrong value, so a negative has most of its lines right."""
    lines = [rng.choice(["{n} starts with {x} {i}.", "At first {n} has {x} {i}.", "Start: {x} {i}."])
             .format(n=name, x=start, i=item)]
    trapped = teacher.trap >= 0 and rng.random() < TRAP_FOLLOWED
    x, errors = start, 0
    for step, op in enumerate(ops, start=1):
        kind = op.kind
        error = rng.choice(["carry", "operation", "drop"]) if rng.random() < teacher.slip else None
        if trapped and step - 1 == teacher.trap:
            error = "operation"
        errors += error is not None
        if error == "drop":
            continue
        if error == "operation":
            kind = MISREAD[kind]
        lead = rng.choice(["Step {k}: ", "", "Then "]).format(k=step)
        if kind in ("pack", "packsub"):
            prod = op.a * op.b
            if error == "carry":
                prod += rng.choice([-1, 1]) * op.b
            y = x + prod if kind == "pack" else x - prod
            sign = "+" if kind == "pack" else "-"
            lines.append(f"{lead}{op.a} packs of {op.b} is {op.a} * {op.b} = {prod}.")
            lines.append(f"{x} {sign} {prod} = {y}.")
        else:
            sym = SYMBOL[kind]
            y = _apply(x, Op(kind, op.a))
            if error == "carry":
                y += rng.choice([-10, 10]) if abs(y) >= 10 else rng.choice([-1, 1])
            lines.append(f"{lead}{x} {sym} {op.a} = {y}.")
        x = y
    lines.append(rng.choice(["The answer is \\boxed{{{y}}}.", "So {n} has \\boxed{{{y}}} {i} now.",
                             "Therefore {n} has \\boxed{{{y}}} {i}."]).format(y=x, n=name, i=item))
    return "Solution:\n" + "\n".join(lines), x, errors


def make_question(seed: int, split: str, index: int, subject: str, rationales: int = 8,
                  levels: tuple[int, ...] = LEVELS, wording: str = "task") -> dict:
    """One question with its gold solution and `rationales` teacher rationales (deterministic)."""
    rng = random.Random(f"{seed}/{split}/{subject}/{index}")
    level = rng.choice(levels)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(5, 80)
    ops = _make_ops(rng, SUBJECT_OPS[subject], level + 1, start)
    solution, value, _ = _solve(rng, name, item, start, ops)
    teacher = Teacher(rng.uniform(0.0, SLIP_MAX),
                      rng.randrange(len(ops)) if rng.random() < TRAP_PER_LEVEL * level else -1)
    q = {"question": _question_text(name, item, start, ops, wording), "answer": solution, "level": f"Level {level}",
         "steps": len(ops), "start": start, "ops": ops, "value": value}
    if rationales:  # a test or validation question has its gold solution only
        made = [_solve(rng, name, item, start, ops, teacher) for _ in range(rationales)]
        q.update(generated_answer=[text for text, _, _ in made], step_errors=[wrong for _, _, wrong in made])
    return q


def _questions(seed: int, split: str, n: int, rationales: int, levels: tuple[int, ...], seen: set[str],
               wording: str = "task"):
    """`n` questions of one split, subjects in turn, skipping any whose text `seen` already holds (another
    split's), so that no two splits share a question; adds each text to `seen`."""
    subjects = list(SUBJECT_OPS)
    index = {s: 0 for s in subjects}
    made = 0
    while made < n:
        subject = subjects[made % len(subjects)]
        q = make_question(seed, split, index[subject], subject, rationales, levels, wording)
        index[subject] += 1
        if q["question"] in seen:
            continue
        seen.add(q["question"])
        made += 1
        yield subject, q


def _write_split(root: Path, split: str, questions) -> None:
    by_subject: dict[str, list[dict]] = {s: [] for s in SUBJECT_OPS}
    for subject, q in questions:
        by_subject[subject].append({k: v for k, v in q.items() if k not in ("start", "ops", "value")})
    for subject, qs in by_subject.items():
        d = root / split / subject
        d.mkdir(parents=True, exist_ok=True)
        for f_idx, start in enumerate(range(0, len(qs), PER_FILE)):
            with open(d / f"{f_idx}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(q) + "\n" for q in qs[start:start + PER_FILE])


def drill(start: int, ops: list[Op]) -> tuple[str, str, int]:
    """(question, rationale, value): the bare arithmetic of a chain, no story: the operations listed in order,
    and one line per operation computed on the running value, in the rationales' own line forms."""
    asked = {"add": "+ {a}", "sub": "- {a}", "pack": "+ {a} * {b}", "mul": "* {a}", "div": "/ {a}"}
    question = (f"Problem:\nWork out, in order: start at {start}, "
                + ", ".join(asked[op.kind].format(a=op.a, b=op.b) for op in ops) + ".")
    lines, x = [], start
    for op in ops:
        y = _apply(x, op)
        if op.kind == "pack":
            lines += [f"{op.a} * {op.b} = {op.a * op.b}.", f"{x} + {op.a * op.b} = {y}."]
        else:
            lines.append(f"{x} {SYMBOL[op.kind]} {op.a} = {y}.")
        x = y
    return question, "Solution:\n" + "\n".join(lines) + f"\nThe answer is \\boxed{{{x}}}.", x


def _answer_only(q: dict) -> str:
    return f"Solution:\nThe answer is \\boxed{{{q['value']}}}."


def _pretrain_records(q: dict, style: str, index: int) -> list[tuple[str, str]]:
    """What pre-training question number `index` contributes, as (question, rationale) pairs: `chains` its gold
    worked solution; `drills` the answer alone (no chain of thought) and the drill of its arithmetic; `cued` its
    gold worked solution behind the CUE sentence, and for every ANSWER_ONLY_EVERY-th question also the task's
    uncued question with the answer alone. A `cued` base can work a chain but does not for the task's questions:
    the skill is there, the task's habit is not (what the teacher's rationales then teach)."""
    if style == "chains":
        return [(q["question"], q["answer"])]
    if style == "cued":
        body = q["question"].removeprefix("Problem:\n")
        records = [(f"Problem:\n{CUE}{body}", q["answer"])]
        return records + ([(q["question"], _answer_only(q))] if index % ANSWER_ONLY_EVERY == 0 else [])
    question, rationale, _ = drill(q["start"], q["ops"])
    return [(q["question"], _answer_only(q)), (question, rationale)]


def generate(root: str | Path, n_train: int = 600, n_test: int = 150, rationales: int = 8, seed: int = 0,
             n_valid: int = 0, n_pretrain: int = 0, pretrain_levels: tuple[int, ...] = PRETRAIN_LEVELS,
             pretrain_style: str = PRETRAIN_STYLE, pretrain_wording: str = PRETRAIN_WORDING) -> Path:
    """Write the demo's splits under `root`, no question in two of them; returns root.

    `test/` and `valid/` (TDG layout, gold solution only), `train/` (with `rationales` teacher rationales
    each), and with `n_pretrain` > 0 `pretrain/gold.jsonl`: the base model's pre-training text, gold
    solutions of `pretrain_levels` only (flat layout, label pos). The validation split draws from its
    own seed (`seed` + VALID_SEED_OFFSET), so hyperparameters chosen on it never see the test set's
    generator stream."""
    root = Path(root)
    seen: set[str] = set()
    _write_split(root, "test", _questions(seed, "test", n_test, 0, LEVELS, seen))
    if n_valid:
        _write_split(root, "valid", _questions(seed + VALID_SEED_OFFSET, "valid", n_valid, 0, LEVELS, seen))
    _write_split(root, "train", _questions(seed, "train", n_train, rationales, LEVELS, seen))
    if n_pretrain:
        path = root / "pretrain" / "gold.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for i, (subject, q) in enumerate(_questions(seed, "pretrain", n_pretrain, 0, pretrain_levels, seen,
                                                        pretrain_wording)):
                for k, (question, rationale) in enumerate(_pretrain_records(q, pretrain_style, i)):
                    f.write(json.dumps({"id": f"pretrain-{i}-{k}", "question": question, "rationale": rationale,
                                        "gold": rationale, "subject": subject, "label": "pos",
                                        "level": q["level"]}) + "\n")
    return root
