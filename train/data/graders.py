"""Answer equivalence: `math-verify` (default) or the MATH paper's string normalisation.

A grader is `f(gold, pred) -> bool` on extracted final answers (no `\\boxed{}` around them).
Graders do no timeout handling of their own; `train.data.grading` runs them in worker
processes with a per-item timeout.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from fractions import Fraction

Grader = Callable[[str, str], bool]
GRADERS = ("math-verify", "hendrycks")


# --- Hendrycks et al. 2021 (MATH): normalise both strings, then compare ----------------------


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{b}` -> `\\frac{1}{b}`."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    """`3/4` (integers) -> `\\frac{3}{4}`."""
    a, sep, b = s.partition("/")
    if sep and a.isdigit() and b.isdigit() and "/" not in b:
        return f"\\frac{{{int(a)}}}{{{int(b)}}}"
    return s


def _remove_right_units(s: str) -> str:
    """`5\\text{ cm}` -> `5` (units written with a leading space inside \\text)."""
    if "\\text{ " in s:
        return s.split("\\text{ ")[0]
    return s


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if part and part[0] != "{":
            out += "\\sqrt{" + part[0] + "}" + part[1:]
        else:
            out += "\\sqrt" + part
    return out


def normalize_hendrycks(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:
        s = rhs
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def hendrycks_equal(gold: str, pred: str) -> bool:
    return normalize_hendrycks(gold) == normalize_hendrycks(pred)


# --- math-verify -----------------------------------------------------------------------------


_INT = re.compile(r"^-?\d+$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def _exact_rational(s: str) -> Fraction | None:
    """An integer or `\\frac{a}{b}` (spaces ignored) as an exact Fraction; None for anything else."""
    s = "".join(s.split())
    if _INT.match(s):
        return Fraction(int(s))
    m = _FRAC.match(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    return None


@functools.lru_cache(maxsize=16384)
def _mv_parse(expr: str) -> list:
    """Parsing is most of math-verify's cost, and each gold answer meets several predictions."""
    from math_verify import parse

    return parse(f"${expr}$", parsing_timeout=None)


def math_verify_equal(gold: str, pred: str) -> bool:
    """Symbolic equivalence via math-verify. Its own signal-based timeouts are off: ours wrap it."""
    from math_verify import verify

    exact_g, exact_p = _exact_rational(gold), _exact_rational(pred)
    if exact_g is not None and exact_p is not None:  # most MATH answers: decided without sympy
        return exact_g == exact_p
    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return gold.strip() == pred.strip()
    return bool(verify(g, p, timeout_seconds=None))


def get_grader(name: str) -> Grader:
    if name == "math-verify":
        # math-verify warns on every call that its timeouts are disabled; we run our own.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        return math_verify_equal
    if name == "hendrycks":
        return hendrycks_equal
    raise ValueError(f"unknown grader {name!r}; choose from {', '.join(GRADERS)}")
