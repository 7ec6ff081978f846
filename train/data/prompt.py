"""The one prompt template every stage uses, and the labels stripped from input text.

The reference trains on `Problem:\\n{question}` + `\\nSolution:\\n{rationale}` and tests on the same
`Problem:\\n{problem}` prefix, so the default template is `Problem:\\n{question}\\nSolution:\\n`. Input
files disagree on whether the labels are part of the text: the authors' TDG files carry
`Problem:\\n` in every question and `Solution:\\n` at the start of most rationales, MATH test lines
carry neither. Readers therefore strip a leading `Problem:` / `Solution:` label, so that every
format reaches the template as the bare text and no label ever appears twice.

With `data.prompt_format: chat` the rendered template is the user message of the tokenizer's own
chat template (`apply_chat_template`, generation prompt added; `data.system_prompt` as the system
message), and that text replaces BOS + template: the chat template adds the special tokens the
model expects. `Prompt` carries the three settings; every stage, eval and the ranker build prompts
through it.

Every stage records its prompt (config.yaml; `tdg.json` in an export); a stage reading another
stage's output refuses one trained with a different prompt (`check_same_prompt`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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


PROMPT_FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class Prompt:
    """How a question becomes the text before the rationale. Field names as in DataConfig and the records."""

    prompt_template: str = DEFAULT_TEMPLATE
    prompt_format: str = "plain"  # plain: BOS + template; chat: the tokenizer's chat template around it
    system_prompt: str = ""  # chat only: the system message

    @classmethod
    def of(cls, data) -> Prompt:
        """The prompt of a stage's `data` section."""
        return cls(data.prompt_template, data.prompt_format, data.system_prompt)

    @classmethod
    def from_record(cls, rec: dict) -> Prompt:
        """From config.yaml's data section, ranker.json or tdg.json (outputs from before chat: plain)."""
        return cls(rec.get("prompt_template") or DEFAULT_TEMPLATE, rec.get("prompt_format") or "plain",
                   rec.get("system_prompt") or "")

    def record(self) -> dict:
        return {"prompt_template": self.prompt_template, "prompt_format": self.prompt_format,
                "system_prompt": self.system_prompt}

    def uses_bos(self) -> bool:
        """Plain prompts get the tokenizer's BOS id in front; a chat template writes its own special tokens."""
        return self.prompt_format == "plain"

    def text(self, tokenizer, question: str) -> str:
        """The prompt text of one question (for chat: the rendered chat template, special tokens included)."""
        user = render_prompt(self.prompt_template, question)
        if self.prompt_format == "plain":
            return user
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.prompt_format=chat but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')})"
                              " has no chat template; use prompt_format=plain or a tokenizer with one")
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            [{"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError, raised by templates that refuse e.g. a system role
            raise ConfigError(f"the tokenizer's chat template refuses this prompt ({e}); "
                              + ("its model may take no system message: leave data.system_prompt empty"
                                 if self.system_prompt else "check the template")) from None

    def differences(self, other: Prompt) -> list[str]:
        """The settings (record keys) in which the two differ."""
        return [k for k in self.record() if getattr(self, k) != getattr(other, k)]


def as_prompt(prompt: Prompt | str) -> Prompt:
    """A bare template string is a plain prompt."""
    return Prompt(prompt) if isinstance(prompt, str) else prompt


def recorded_prompt(path: str | Path) -> Prompt | None:
    """The prompt a stage output or an exported model was trained with; None if it records none
    (a model from elsewhere)."""
    p = Path(path)
    if (p / EXPORT_JSON).is_file():
        return Prompt.from_record(json.loads((p / EXPORT_JSON).read_text()))
    if (p / "config.yaml").is_file():
        data = (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("data") or {}
        return Prompt.from_record(data) if "prompt_template" in data else None
    return None


def check_same_prompt(mine: Prompt, other: str | Path, what: str, key: str = "data") -> None:
    """Refuse to build on an output trained with a different prompt (template, format or system prompt)."""
    theirs = recorded_prompt(other)
    if theirs is not None and theirs != mine:
        raise ConfigError("; ".join(f"{key}.{k} is {getattr(mine, k)!r} but {what} {other} was trained with "
                                    f"{getattr(theirs, k)!r}" for k in mine.differences(theirs))
                          + "; every stage must use one prompt template, format and system prompt")
