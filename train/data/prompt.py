"""The one prompt template every stage uses, and the labels stripped from input text.

The reference trains on `Problem:\\n{question}` + `\\nSolution:\\n{rationale}` and tests on the same
`Problem:\\n{problem}` prefix, so the default template is `Problem:\\n{question}\\nSolution:\\n`. Input
files disagree on whether the labels are part of the text: the authors' TDG files carry
`Problem:\\n` in every question and `Solution:\\n` at the start of most rationales, MATH test lines
carry neither. Readers therefore strip a leading `Problem:` / `Solution:` label, so that every
format reaches the template as the bare text and no label ever appears twice.

Every stage records its template (config.yaml; `tdg.json` in an export); a stage reading another
stage's output refuses one trained with a different template (`check_same_template`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from train.errors import ConfigError

DEFAULT_TEMPLATE = "Problem:\n{question}\nSolution:\n"
FIELD = "{question}"
EXPORT_JSON = "tdg.json"  # written by `tdg export` beside the weights: the template the model was trained with

_QUESTION_LABEL = re.compile(r"\A\s*Problem:\s*")
_RATIONALE_LABEL = re.compile(r"\A\s*Solution:\s*")


def bare_question(text: str) -> str:
    """The question without a leading `Problem:` label (the template adds it)."""
    return _QUESTION_LABEL.sub("", text, count=1)


def bare_rationale(text: str) -> str:
    """The rationale without a leading `Solution:` label (the template ends with it)."""
    return _RATIONALE_LABEL.sub("", text, count=1)


def check_template(template: str, key: str = "data.prompt_template") -> str:
    if template.count(FIELD) != 1:
        raise ConfigError(f"{key}: must contain {FIELD} exactly once, got {template!r}")
    return template


def render_prompt(template: str, question: str) -> str:
    """The prompt text of one question (plain substitution: LaTeX braces in questions are safe)."""
    return template.replace(FIELD, question)


def recorded_template(path: str | Path) -> str | None:
    """The template a stage output or an exported model was trained with; None if it records none
    (a model from elsewhere)."""
    p = Path(path)
    if (p / EXPORT_JSON).is_file():
        return json.loads((p / EXPORT_JSON).read_text()).get("prompt_template")
    if (p / "config.yaml").is_file():
        cfg = yaml.safe_load((p / "config.yaml").read_text()) or {}
        return (cfg.get("data") or {}).get("prompt_template")
    return None


def check_same_template(mine: str, key: str, other: str | Path, what: str) -> None:
    """Refuse to build on an output trained with a different prompt template."""
    theirs = recorded_template(other)
    if theirs is not None and theirs != mine:
        raise ConfigError(f"{key} is {mine!r} but {what} {other} was trained with {theirs!r}; "
                          "every stage must use one prompt template")
