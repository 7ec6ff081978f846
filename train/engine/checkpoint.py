"""Checkpoint bookkeeping around DeepSpeed's save/load: integrity, fallback, and the recipe it was saved under.

Layout: `<output>/checkpoints/step<N>/` is a DeepSpeed tag directory. A checkpoint counts only once
`COMPLETE.json` is in it: written by rank 0 after every rank returned from `save_checkpoint` and had
fsynced and hashed its share of the files. It records the training position, the world size, every
file with its size and sha256, and the training recipe (`recipe_of`). An unreadable COMPLETE.json
makes the checkpoint incomplete.

Before a resume, each rank checks its share of the newest complete checkpoint's files against the
record; if any rank finds a missing, truncated or changed file (or the load itself fails), every rank
falls back to the next older complete checkpoint, and the log says which file was at fault. Older
checkpoints are deleted only after a newer one is complete (`keep_last`).

A checkpoint saved with a different world size is converted with DeepSpeed's universal checkpoint tool
(`ds_to_universal`) into `step<N>_universal/` and loaded with `load_universal`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from train.errors import TdgError
from train.manifest import WATCH_KEYS, file_digest

COMPLETE = "COMPLETE.json"
_TAG = re.compile(r"^step(\d+)$")
POSITION_KEYS = ("global_step", "epoch", "samples_in_epoch", "world_size", "tag")
# Not the recipe (what changes the weights), so a resume may change them: where things are (the inputs are
# compared by content hash), how the run is watched (logging, progress, loggers) and how the same arithmetic
# is carried out (memory-for-time trades). Every other config key is the recipe.
RECIPE_EXCLUDED = ("model.path", "data.path", "nat.neg_adapter", "distill.scores", "distill.nat_dir", *WATCH_KEYS)


@dataclass
class Position:
    """Where training stands: enough to continue from the exact next batch on any world size."""

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of this epoch's batch order already consumed
    world_size: int = 1
    tag: str = ""


def read_record(tag_dir: Path) -> dict | None:
    """COMPLETE.json of a checkpoint; None when absent or unreadable (then the checkpoint is incomplete)."""
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
        Position(**{k: record[k] for k in POSITION_KEYS})
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(root: Path) -> list[Position]:
    """Complete checkpoints under `root`, oldest first."""
    found = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _TAG.match(d.name)
        record = read_record(d) if m else None
        if record is not None:
            found.append(Position(**{k: record[k] for k in POSITION_KEYS}))
    return sorted(found, key=lambda p: p.global_step)


def latest(root: Path) -> Position | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _my_share(files: list[str], rank: int, world: int) -> list[str]:
    """The files this rank hashes or checks: every world-th of them, sorted (the work spread over the ranks)."""
    return sorted(files)[rank::world]


def hash_my_files(tag_dir: Path, rank: int, world: int) -> dict[str, dict]:
    """fsync and hash this rank's share of a just-saved checkpoint: {relative path: {size, sha256}}."""
    files = [p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE
             and not p.name.startswith(".")]
    records = {}
    for rel in _my_share(files, rank, world):
        path = tag_dir / rel
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        records[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return records


def mark_complete(root: Path, pos: Position, files: dict[str, dict], recipe: dict,
                  eval_history: list[dict], layout: dict | None = None) -> None:
    """Write COMPLETE.json (fsynced, then renamed into place, then the directory fsynced). `eval_history`: the
    held-out evaluations up to this step, so a resumed run's DONE.json lists those of the runs before it;
    `layout`: how DeepSpeed laid the files out (the ZeRO stage), which a resume must match to load them."""
    tag_dir = root / pos.tag
    tmp = tag_dir / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({**asdict(pos), "files": files, "recipe": recipe, "eval_history": eval_history,
                            "layout": layout or {}}))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(tag_dir / COMPLETE)
    fd = os.open(tag_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_my_files(tag_dir: Path, rank: int, world: int) -> str | None:
    """The first problem with this rank's share of a checkpoint's recorded files, or None. Checkpoints written
    before files were recorded have nothing to check."""
    record = read_record(tag_dir)
    if record is None:
        return f"{tag_dir / COMPLETE}: unreadable"
    files = record.get("files", {})
    for rel in _my_share(list(files), rank, world):
        path, want = tag_dir / rel, files[rel]
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, {want['size']} when saved (truncated or replaced)"
        if file_digest(path) != want["sha256"]:
            return f"{path}: contents changed since it was saved (sha256 differs)"
    return None


def recipe_of(config: dict, inputs: dict[str, str]) -> dict:
    """What a checkpoint was trained under and a resume must share: the stage config without the keys that only
    say where things are or how the run is watched, and the inputs by content hash instead of by path."""
    recipe = json.loads(json.dumps(config))  # a deep copy
    for key in RECIPE_EXCLUDED:
        section, _, name = key.partition(".")
        recipe.get(section, {}).pop(name, None)
    return {"config": recipe, "inputs": inputs}


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
    (out / COMPLETE).write_text(json.dumps({**asdict(pos), "files": {}, "recipe": {}}))
    return tag
