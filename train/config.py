"""Typed stage configs: a YAML file plus dotted `key=value` overrides from the command line.

Every stage has one dataclass (sections are nested dataclasses). Loading validates strictly:
an unknown key names itself and the valid keys; a wrong type names the key, the value and the
expected type. The resolved config is written next to every stage's output (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from train.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class DataConfig:
    """Where the prepared data is and how it is cut into batches."""

    path: str = ""  # a directory written by `tdg prepare`
    max_len: int = 256  # cutoff per sample in tokens (prompt + rationale), as in the paper
    max_tokens: int = 4096  # token budget of one micro-batch (padded tokens count)
    packing: bool = False  # one row per micro-batch, samples concatenated, attention kept per sample
    mask_prompt: bool = True  # no loss on the question tokens
    group_size: int = 512  # samples per length-grouping window (bigger: less padding, less random)
    seed: int = 0


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any or isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: value {value!r} has the wrong type; expected {_type_name(tp)}")


def _build(cls: type[T], raw: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ConfigError(
                f"unknown key {prefix}{k!s}; valid keys here: {', '.join(sorted(prefix + f for f in fields))}"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so types come out natural."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        out.append((key, value))
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (optional) and dotted overrides, validating every key."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config keys")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    where = f"{path}: " if path is not None else ""
    try:
        return _build(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
