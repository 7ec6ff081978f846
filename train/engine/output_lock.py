"""One run per output directory: rank 0 holds an exclusive lock on the directory and on `<output_dir>/.lock`
for the whole run (the directory's lock cannot be bypassed by deleting the file).

Two runs started into one directory would both train and write checkpoints that prune each other's.
The lock is `flock(2)`, so the kernel releases it when the process dies, however it dies: a crashed
or killed run never leaves a stale lock behind. The file names the holder (PID, host, start time) for
the error the second run gets. (On a network file system flock needs the `flock` mount option:
Lustre and NFSv4 have it; without it the lock is per node.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from train.engine import distributed as dist_
from train.errors import TdgError

LOCK = ".lock"
_held: list = []  # open lock files, kept for the life of the process


def hold(out_dir: str | Path, stage: str) -> None:
    """Collective: rank 0 takes the lock; every rank raises TdgError if another run holds it."""
    problem = None
    if dist_.is_main():
        problem = _acquire(Path(out_dir), stage)
    problem = dist_.broadcast_object(problem)
    if problem:
        raise TdgError(problem)


def _acquire(out: Path, stage: str) -> str | None:
    out.mkdir(parents=True, exist_ok=True)
    in_use = (f"engine.output_dir {out} is in use by {{}}; two runs must not share an output directory "
              "(wait for it, or give this run another engine.output_dir)")
    if not _lock_dir(out):  # the directory itself: deleting .lock does not let a second run in
        holder = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
        return in_use.format(holder or "another run (its .lock file was deleted)")
    f = open(out / LOCK, "a+")  # noqa: SIM115 -- held open (and locked) until the process ends
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return in_use.format(holder)
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()} (stage {stage}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _held.append(f)
    return None


def _lock_dir(out: Path) -> bool:
    """flock the directory itself; False if another process holds it. Where the file system cannot lock a
    directory (some NFS mounts), only the .lock file guards the run."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # EBADF, ENOLCK, EOPNOTSUPP: no directory locks here
        os.close(fd)
        return True
    _held.append(fd)
    return True
