"""Progress of long loops: a tqdm bar on a terminal, a plain timestamped line now and then elsewhere.

Slurm (and nohup, and `> log 2>&1`) send stderr to a file, where tqdm's carriage-return redraws
pile up into one line of megabytes that `tail -f` cannot show. There the same meter is written as
a line of its own every `LINE_INTERVAL_S` seconds, after the first update and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 30.0
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineProgress:
    """The subset of tqdm's interface the stages use (update, set_postfix, close), printed as lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, interval: float = LINE_INTERVAL_S,
                 file: TextIO | None = None):
        self.total, self.desc, self.unit, self.initial, self.interval = total, desc, unit, initial, interval
        self.file = file if file is not None else sys.stderr
        self.n, self.postfix, self.printed_at = initial, "", None
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.printed_at is None or now - self.last >= self.interval:  # the first update is always shown
            self._write(now)

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.printed_at != self.n:
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        meter = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                  postfix=self.postfix or None, initial=self.initial, bar_format=LINE_FORMAT)
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {meter}", file=self.file, flush=True)
        self.last, self.printed_at = now, self.n


def progress(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm | LineProgress:
    """A bar when stderr is a terminal, lines when it is a file, nothing (a disabled tqdm) when not enabled."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial)
