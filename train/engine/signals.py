"""Stop requests: SIGUSR1 (Slurm's `--signal=B:USR1@N` forwarded by our launcher) or SIGTERM.

The handler only sets a flag; the loop all-reduces it after every optimizer step so all ranks
stop after the same step, write a checkpoint and exit with EXIT_CHECKPOINTED.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry". The Slurm launcher requeues on it.
EXIT_CHECKPOINTED = 75


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
