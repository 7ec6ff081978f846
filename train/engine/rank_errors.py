"""One line per failure on a multi-rank run.

A named error (bad input, a damaged file, wrong wiring) is usually found by every rank, or found by one while
the others wait in a collective and then die of gloo's "Connection closed by peer". Either way the user used
to read the same message once per rank, between tracebacks. Here the first process on a node to report a
message prints it; a rank that lost its peers after another rank of the run failed exits quietly.
Markers are empty files in the temp dir, keyed by the launch (node-local: each node prints once); each new
marker sweeps away those older than a day, so failed runs do not pile files up in /tmp.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")
STALE_SECONDS = 24 * 3600  # far beyond any collective's timeout: every rank of that launch has reported


def _run_key() -> str | None:
    """This launch on this node: the launcher that started this rank (torchrun's agent, or srun's step
    daemon), by PID and start time, so a requeued job is a new launch. None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = os.environ.get("MASTER_PORT", "")
    return f"{parent}/{started}"


def _marker(kind: str, text: str = "") -> Path | None:
    key = _run_key()
    if key is None:
        return None
    digest = hashlib.sha1(f"{key}\0{kind}\0{text}".encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"tdg-{kind}-{digest}"


def _first(marker: Path | None) -> bool:
    """Create `marker`; True if this process did (or there is none to create)."""
    if marker is None:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        _sweep(marker.parent)
        return True
    except FileExistsError:
        return False
    except OSError:
        return True  # no temp dir to coordinate through: print rather than lose the message


def _sweep(directory: Path) -> None:
    """Remove this module's markers older than STALE_SECONDS (another user's, or one just removed, are skipped)."""
    cutoff = time.time() - STALE_SECONDS
    for old in (*directory.glob("tdg-failed-*"), *directory.glob("tdg-reported-*")):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def mark_failed() -> None:
    """Record that a rank of this run failed, before its exit closes the others' connections."""
    _first(_marker("failed"))


def first_to_report(message: str) -> bool:
    """Whether this rank prints `message`: the first on this node of this run to report it."""
    mark_failed()
    return _first(_marker("reported", message))


def lost_peer_after_failure(error: BaseException) -> bool:
    """A collective that failed because another rank of this run failed first (and said why)."""
    marker = _marker("failed")
    return marker is not None and marker.exists() and any(s in str(error) for s in PEER_LOST)
