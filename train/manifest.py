"""`DONE.json`: the manifest every stage writes last into its output directory.

Its presence means the stage finished; a stage that finds it skips. It records the resolved
config, the hashes of the inputs and the final metrics, so an output can be traced back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from train import __version__

DONE = "DONE.json"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path) -> str:
    """A finished stage directory is identified by its DONE.json; otherwise hash every file."""
    p = Path(path)
    if (p / DONE).is_file():
        return file_digest(p / DONE)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def write_done(out_dir: str | Path, config: Any, inputs: dict[str, str], metrics: dict) -> Path:
    """Write DONE.json atomically (temp + rename) so a crash never leaves a half manifest."""
    out = Path(out_dir)
    record = {"version": __version__, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": config, "inputs": inputs, "metrics": metrics}
    tmp = out / f".{DONE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, out / DONE)
    return out / DONE


def read_done(out_dir: str | Path) -> dict | None:
    p = Path(out_dir) / DONE
    if not p.is_file():
        return None
    return json.loads(p.read_text())
