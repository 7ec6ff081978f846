"""Final-answer extraction: the content of the last `\\boxed{...}` or `\\fbox{...}`."""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last boxed expression, braces balanced; `\\boxed 5` (no braces) also counts.

    Returns None when the text has no boxed answer or the last one is unterminated.
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if start >= len(text):
        return None
    if text[start] != "{":
        m = re.match(r"[^\s$]+", text[start:])
        return m.group(0) if m else None
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i].strip()
    return None
