"""The embedded default data: multi-step arithmetic word problems and a noisy step-by-step solver.

Each question tracks one quantity through 2-6 operations (add, take away, buy packs of b, scale,
share equally). The solver writes one line per operation; with a per-rationale slip rate it makes
the slips people make: a wrong carry (off by ten), the wrong operation, a dropped step. Later
lines are computed correctly from the wrong value, so a negative rationale has most steps right
and only ends wrong, which is what makes negative rationales informative (the paper's premise).

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


@dataclass(frozen=True)
class Op:
    kind: str  # add | sub | pack | mul | div
    a: int
    b: int = 0  # pack: a packs of b


def _question_text(name: str, item: str, start: int, ops: list[Op]) -> str:
    said = {
        "add": "{n} finds {a} more {i}.",
        "sub": "{n} gives {a} {i} to a friend.",
        "pack": "{n} buys {a} packs with {b} {i} in each pack.",
        "mul": "A trade makes the number of {i} {n} has {a} times as large.",
        "div": "{n} shares the {i} equally among {a} people, {n} included, and keeps one share.",
    }
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


def _apply(x: int, op: Op) -> int:
    return {"add": x + op.a, "sub": x - op.a, "pack": x + op.a * op.b, "mul": x * op.a,
            "div": x // op.a if op.a else x}[op.kind]


def _solve(rng: random.Random, name: str, item: str, start: int, ops: list[Op], slip: float) -> tuple[str, int]:
    """One rationale. `slip` is the chance that any one step goes wrong."""
    lines = [rng.choice(["{n} starts with {x} {i}.", "At first {n} has {x} {i}.", "Start: {x} {i}."])
             .format(n=name, x=start, i=item)]
    x = start
    for step, op in enumerate(ops, start=1):
        kind = op.kind
        error = rng.choice(["carry", "operation", "drop"]) if rng.random() < slip else None
        if error == "drop":
            continue
        if error == "operation":
            kind = {"add": "sub", "sub": "add", "pack": "packsub", "mul": "add", "div": "sub"}[kind]
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
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[kind]
            y = _apply(x, Op(kind, op.a))
            if error == "carry":
                y += rng.choice([-10, 10]) if abs(y) >= 10 else rng.choice([-1, 1])
            lines.append(f"{lead}{x} {sym} {op.a} = {y}.")
        x = y
    lines.append(rng.choice(["The answer is \\boxed{{{y}}}.", "So {n} has \\boxed{{{y}}} {i} now.",
                             "Therefore {n} has \\boxed{{{y}}} {i}."]).format(y=x, n=name, i=item))
    return "Solution:\n" + "\n".join(lines), x


def make_question(seed: int, split: str, index: int, subject: str, rationales: int = 8) -> dict:
    rng = random.Random(f"{seed}/{split}/{subject}/{index}")
    level = rng.randint(1, 5)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(5, 80)
    ops = _make_ops(rng, SUBJECT_OPS[subject], level + 1, start)
    solution, _ = _solve(rng, name, item, start, ops, slip=0.0)
    generated = []
    for _ in range(rationales):
        text, _ = _solve(rng, name, item, start, ops, slip=rng.uniform(0.0, 0.25))
        generated.append(text)
    return {"question": _question_text(name, item, start, ops), "answer": solution,
            "generated_answer": generated, "level": f"Level {level}"}


def generate(root: str | Path, n_train: int = 600, n_test: int = 150, rationales: int = 8, seed: int = 0) -> Path:
    """Write `<root>/train/<subject>/*.jsonl` and `<root>/test/<subject>/*.jsonl`; returns root."""
    root = Path(root)
    subjects = list(SUBJECT_OPS)
    for split, n in (("train", n_train), ("test", n_test)):
        for s_idx, subject in enumerate(subjects):
            count = n // len(subjects) + (1 if s_idx < n % len(subjects) else 0)
            d = root / split / subject
            d.mkdir(parents=True, exist_ok=True)
            for f_idx, start in enumerate(range(0, count, PER_FILE)):
                with open(d / f"{f_idx}.jsonl", "w", encoding="utf-8") as f:
                    for i in range(start, min(start + PER_FILE, count)):
                        f.write(json.dumps(make_question(seed, split, i, subject, rationales)) + "\n")
    return root


def write_gold_solutions(path: str | Path, n: int, seed: int = 0) -> Path:
    """Flat-layout jsonl of `n` fresh questions with their correct worked solution (label pos).

    The demo pre-trains its tiny base model on these, standing in for what a real base model
    already knows before distillation starts. They are questions of their own split, so they
    overlap neither the training rationales nor the test set.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subjects = list(SUBJECT_OPS)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            subject = subjects[i % len(subjects)]
            q = make_question(seed, "pretrain", i, subject, rationales=0)
            f.write(json.dumps({"id": f"pretrain-{i}", "question": q["question"], "rationale": q["answer"],
                                "gold": q["answer"], "subject": subject, "label": "pos"}) + "\n")
    return path
