"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class TdgError(Exception):
    """Base class: a message that names the file, line, key or rank at fault."""


class StageStopped(TdgError):
    """A stop request interrupted a launched stage; its checkpoint is written and a rerun resumes it."""


class ConfigError(TdgError):
    """A config file or override is wrong (unknown key, wrong type, inconsistent values)."""


class InputError(TdgError):
    """An input file is wrong. `line` is a line number or a place (`row 12`); `reason` is a short
    machine-readable tag used for skip counts."""

    def __init__(self, path: str, line: int | str | None, message: str, reason: str):
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
