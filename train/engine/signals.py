"""Stop requests: SIGUSR1 (Slurm's `--signal=B:USR1@N` forwarded by our launcher) or SIGTERM.

A handler only sets a flag; a stage's loop all-reduces it after every unit of work (an optimizer step, a
shard, a batch of questions) so all ranks stop at the same point, save and exit with EXIT_CHECKPOINTED.
A stage's worker catches the signals from its first line (`catch_stop_signals`, before torch is imported):
a signal that arrives while it starts up or loads its model is remembered, and the loop's first check
stops every rank with nothing new to save, instead of the signal killing the worker (exit -10: a failure
to the launcher, and nothing requeued).
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry". The Slurm launcher requeues on it.
EXIT_CHECKPOINTED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# the commands whose loops read the flag (a command that never reads it must keep SIGTERM's default)
STOPPABLE_COMMANDS = ("sft", "neg", "nat", "score", "distill", "dpo", "redi", "ranker", "eval", "sample")
_received: int | None = None  # the stop signal caught by catch_stop_signals, if any


def catch_stop_signals(argv: list[str]) -> None:
    """For a stage command (`argv[1]`), from now on this process remembers a stop signal instead of dying of
    it; any other command keeps the default."""
    if argv[1:2] and argv[1] in STOPPABLE_COMMANDS:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _remember)


def _remember(signum, frame) -> None:
    global _received
    _received = signum


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """A stop signal arrived in the block, or before it since catch_stop_signals (start-up)."""
        return self.signum is not None or _received is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
