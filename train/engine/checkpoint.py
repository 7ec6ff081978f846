"""Checkpoint bookkeeping around DeepSpeed's save/load.

Layout: `<output>/checkpoints/step<N>/` is a DeepSpeed tag directory. A checkpoint counts only
once `COMPLETE.json` is in it: rank 0 writes it after every rank returned from
`save_checkpoint`, with the training position and the world size. Resuming picks the newest
complete one; older ones are deleted only after a newer one is complete (`keep_last`).

A checkpoint saved with a different world size is converted with DeepSpeed's universal
checkpoint tool (`ds_to_universal`) into `step<N>_universal/` and loaded with `load_universal`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from train.errors import TdgError

COMPLETE = "COMPLETE.json"
_TAG = re.compile(r"^step(\d+)$")


@dataclass
class Position:
    """Where training stands: enough to continue from the exact next batch on any world size."""

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of this epoch's batch order already consumed
    world_size: int = 1
    tag: str = ""


def complete_checkpoints(root: Path) -> list[Position]:
    """Complete checkpoints under `root`, oldest first."""
    found = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append(Position(**json.loads((d / COMPLETE).read_text())))
    return sorted(found, key=lambda p: p.global_step)


def latest(root: Path) -> Position | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def mark_complete(root: Path, pos: Position) -> None:
    tmp = root / pos.tag / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(asdict(pos)))
    tmp.replace(root / pos.tag / COMPLETE)


def prune(root: Path, keep_last: int) -> None:
    """Delete everything older than the newest `keep_last` complete checkpoints."""
    complete = complete_checkpoints(root)
    if len(complete) <= keep_last:
        return
    oldest_kept = complete[-keep_last].global_step
    for d in root.iterdir():
        m = re.match(r"^step(\d+)(_universal)?$", d.name)
        if m and int(m.group(1)) < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)


def to_universal(root: Path, pos: Position) -> str:
    """Convert checkpoint `pos` to DeepSpeed's universal format (once); return the new tag."""
    tag = f"{pos.tag}_universal"
    out = root / tag
    if (out / COMPLETE).is_file():
        return tag
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / pos.tag),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise TdgError(f"{root / pos.tag}: converting to a universal checkpoint failed "
                       f"(saved on {pos.world_size} ranks):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    (out / COMPLETE).write_text(json.dumps(asdict(pos)))
    return tag
