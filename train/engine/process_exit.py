"""How a `tdg` / `python -m train` process ends: its exit handlers, then `os._exit`, without interpreter finalisation.

torch's background threads (gloo's async work, the autograd engine's graph tasks) can release a tensor's Python
object after a stage's work is done. During `Py_FinalizeEx` that release takes the GIL, CPython unwinds the
thread with `pthread_exit` through a C++ noexcept frame, and the process aborts (SIGABRT, "terminate called
without an active exception"): a finished stage reported to torchrun and Slurm as failed. Destroying the process
group at exit (`distributed.setup`'s atexit) narrows the window but does not close it (pytorch/pytorch#190489,
open); not finalising does. Everything finalisation would do for us is done first: non-daemon threads are joined,
the atexit handlers run (the process group's teardown, logging's flush), and stdout/stderr are flushed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def run_then_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run `main` and end the process with its status, as `raise SystemExit(main())` would, minus finalisation.
    An uncaught exception prints its traceback and exits 1; KeyboardInterrupt keeps Python's own handling."""
    try:
        code = _status(main())
    except SystemExit as e:  # argparse's --help and errors, sys.exit() anywhere below
        code = _status(e.code)
    except Exception:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit_without_finalising(code)


def _status(code: object) -> int:
    """SystemExit's rule: None is 0, an int is itself, anything else is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit_without_finalising(code: int) -> NoReturn:
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; absent elsewhere: finalise normally
    if run_exit_handlers is None:
        raise SystemExit(code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    try:
        run_exit_handlers()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                stream.flush()
        os._exit(code)
