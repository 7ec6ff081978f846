"""Grade (gold, pred) pairs in worker processes so no single expression can hang the run.

Two layers of protection:
- soft: each item runs under SIGALRM in its worker; a timeout raises inside the grader;
- hard: sympy can sit in C code (a huge integer power) where signals are not delivered, so the
  parent watches each worker's current item through shared memory and kills a worker stuck
  past `timeout + 2` s, marks that item as timed out, starts a new worker and requeues the
  rest of the chunk.
A timed-out or crashing item is reported with status `timeout`/`error` and counted as not equal.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from train.data.graders import get_grader
from train.progress import progress

OK, TIMEOUT, ERROR = "ok", "timeout", "error"


@dataclass(frozen=True)
class Grade:
    equal: bool
    status: str  # ok | timeout | error


class _SoftTimeout(BaseException):
    """BaseException, so graders' own `except Exception` (math-verify has several) cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _grade_one(grader, gold: str, pred: str, timeout: float) -> tuple[bool, str]:
    """(equal, status) under a SIGALRM soft timeout; main thread only."""
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return bool(grader(gold, pred)), OK
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        return False, TIMEOUT
    except Exception:
        return False, ERROR


def grade_inline(gold: str, preds: list[str | None], grader: str = "math-verify", timeout: float = 5.0) -> list[bool]:
    """Grade a few answers of one question in this process (no workers): for evaluation, where
    forking a process that holds a model and a process group is unwelcome. None (no answer) is wrong."""
    fn = get_grader(grader)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        cache: dict[str, bool] = {}
        for p in {p for p in preds if p is not None}:
            cache[p] = True if "".join(p.split()) == "".join(gold.split()) else _grade_one(fn, gold, p, timeout)[0]
        return [p is not None and cache[p] for p in preds]
    finally:
        signal.signal(signal.SIGALRM, previous)


def _worker(conn: Connection, grader_name: str, timeout: float, slot: int, progress) -> None:
    """Receive chunks [(index, gold, pred)], send back [(index, equal, status)]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGALRM, _on_alarm)
    grader = get_grader(grader_name)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        out = []
        for i, gold, pred in msg:
            progress[2 * slot] = i
            progress[2 * slot + 1] = time.monotonic()
            out.append((i, *_grade_one(grader, gold, pred, timeout)))
        progress[2 * slot + 1] = 0.0
        conn.send(out)


class _Pool:
    def __init__(self, workers: int, grader: str, timeout: float):
        self.ctx = mp.get_context("fork")  # workers inherit the imported grader modules
        self.grader, self.timeout = grader, timeout
        self.progress = self.ctx.Array("d", 2 * workers, lock=False)
        self.procs: list = [None] * workers
        self.conns: list = [None] * workers
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, self.grader, self.timeout, slot, self.progress),
                             daemon=True)
        p.start()
        child.close()
        self.procs[slot], self.conns[slot] = p, parent
        self.progress[2 * slot + 1] = 0.0

    def restart(self, slot: int) -> None:
        self.procs[slot].kill()
        self.procs[slot].join()
        self.conns[slot].close()
        self._start(slot)

    def close(self) -> None:
        for slot, p in enumerate(self.procs):
            if p.is_alive():
                with contextlib.suppress(OSError):  # the worker may have just died
                    self.conns[slot].send(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def grade_pairs(pairs: list[tuple[str, str]], grader: str = "math-verify", workers: int = 2,
                timeout: float = 5.0, chunk_size: int = 32, show_progress: bool = True) -> list[Grade]:
    """Grade every (gold, pred) pair; identical pairs are graded once."""
    unique = list(dict.fromkeys(pairs))
    index = {p: i for i, p in enumerate(unique)}
    results: list[Grade | None] = [None] * len(unique)
    for i, (g, p) in enumerate(unique):
        if "".join(g.split()) == "".join(p.split()):
            results[i] = Grade(True, OK)  # identical up to spaces: no symbolic work needed
    pending = [[(i, *unique[i]) for i in range(s, min(s + chunk_size, len(unique))) if results[i] is None]
               for s in range(0, len(unique), chunk_size)]
    pending = [c for c in pending if c]
    if pending:
        _run_pool(pending, results, max(1, workers), grader, timeout, show_progress)
    return [results[index[p]] for p in pairs]  # type: ignore[misc]


def _run_pool(pending: list[list[tuple[int, str, str]]], results: list, workers: int, grader: str,
              timeout: float, show_progress: bool) -> None:
    pool = _Pool(min(workers, len(pending)), grader, timeout)
    busy: dict[int, list] = {}  # slot -> chunk in flight
    hard = timeout + 2  # the soft alarm fired at `timeout`; still busy 2 s later means stuck in C
    total = sum(len(c) for c in pending)
    bar = progress(total, "grading", "ans", enabled=show_progress)
    try:
        while pending or busy:
            for slot in range(len(pool.procs)):
                if slot not in busy and pending:
                    busy[slot] = pending.pop()
                    pool.conns[slot].send(busy[slot])
            ready = wait([pool.conns[s] for s in busy], timeout=0.2)
            for slot in [s for s in busy if pool.conns[s] in ready]:
                try:
                    out = pool.conns[slot].recv()
                except EOFError:  # the worker died (e.g. out of memory): treat like a hang
                    out = None
                if out is None:
                    _requeue_stuck(pool, slot, busy, pending, results, ERROR, bar)
                    continue
                for i, eq, status in out:
                    results[i] = Grade(eq, status)
                bar.update(len(out))
                del busy[slot]
            now = time.monotonic()
            for slot in list(busy):
                started = pool.progress[2 * slot + 1]
                if started and now - started > hard:
                    _requeue_stuck(pool, slot, busy, pending, results, TIMEOUT, bar)
    finally:
        bar.close()
        pool.close()


def _requeue_stuck(pool: _Pool, slot: int, busy: dict, pending: list, results: list, status: str, bar) -> None:
    """Record the current item of `slot` as failed, restart the worker, requeue the rest of its chunk."""
    chunk = busy.pop(slot)
    stuck = int(pool.progress[2 * slot])
    if any(item[0] == stuck for item in chunk):  # else it died before its first item: retry all
        results[stuck] = Grade(False, status)
        bar.update(1)
    rest = [item for item in chunk if item[0] != stuck or results[stuck] is None]
    if rest:
        pending.append(rest)
    pool.restart(slot)
