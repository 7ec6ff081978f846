"""`DONE.json`: the manifest every stage writes last into its output directory.

Its presence means the stage finished; a stage that finds it skips. It records the stage that
wrote it, the resolved config, the hashes of the inputs and the final metrics, so an output can
be traced back, and a stage pointed at the wrong kind of output can say so (`check_stage_output`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train import __version__
from train.errors import TdgError

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


def prepared_digest(path: str | Path) -> str:
    """Prepared data by content: the sha256 of its parquet shards (not of DONE.json, which records paths), so
    a moved copy is the same data and an edited shard is not."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("data-*.parquet")):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


SAMPLE = 1 << 20  # bytes read at each of three places of a weight file


def weights_fingerprint(model_dir: str | Path) -> str:
    """A model dir's weights by content, cheaply: config.json, and per weight file its size and three 1 MiB
    blocks (start, which holds the safetensors header, middle, end). Two checkpoints of one architecture
    differ in every block, so this tells them apart without hashing 14-140 GB at every start. Computed once
    per process for files of unchanged size and mtime (a stage start checks the base more than once)."""
    d = Path(model_dir)
    files = sorted(f for pattern in ("config.json", "*.safetensors", "*.bin") for f in d.glob(pattern))
    return _fingerprint(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=64)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, size, _ in files:
        h.update(f"{Path(name).name}:{size}".encode())
        with open(name, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                fh.seek(offset)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def trained_on_other_weights(stage_dir: str | Path, model_dir: str | Path) -> bool:
    """Whether the stage output at `stage_dir` recorded (DONE.json inputs) base weights other than those now at
    `model_dir`. False where nothing was recorded (an older version) or the base is not a local dir."""
    trained_on = ((read_done(stage_dir) or {}).get("inputs") or {}).get("weights")
    return bool(trained_on) and Path(model_dir).is_dir() and trained_on != weights_fingerprint(model_dir)


# keys that say where a run writes, how it is watched, or how it trades memory for time: neither a resumed run
# (train.engine.checkpoint.RECIPE_EXCLUDED) nor a finished output (HOW_NOT_WHAT) must match them
WATCH_KEYS = ("engine.output_dir", "engine.ds_config", "engine.save_every", "engine.keep_last", "engine.log_every",
              "engine.peak_tflops", "engine.progress", "engine.dist_timeout_minutes", "engine.resume_changed_config",
              "engine.report_to", "model.gradient_checkpointing", "model.loss_chunk_tokens",
              "model.attn_implementation")
# ... and for a finished output, the settings of how fast a stage generates or scores: a requeued job on another
# node may well pick another backend, kernel or batch size
HOW_NOT_WHAT = (*WATCH_KEYS, "engine.attn_implementation", "eval.batch_questions", "eval.max_batch_tokens",
                "eval.backend", "eval.server", "eval.vllm", "sample.batch_questions", "sample.max_batch_tokens",
                "sample.backend", "sample.server", "sample.vllm", "score.shard_size", "score.restart")


def config_changes(a: dict, b: dict, skip: Callable[[str, Any], bool] | None = None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs, as 'key: a -> b'; `skip(key, value in b)` leaves
    a key (and what is under it) out."""
    changes = []
    for key in sorted(set(a) | set(b)):
        dotted, x, y = prefix + key, a.get(key), b.get(key)
        if skip is not None and skip(dotted, y):
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            changes += config_changes(x, y, skip, f"{dotted}.")
        elif x != y:
            changes.append(f"{dotted}: {x!r} -> {y!r}")
    return changes


def finished_config_changes(recorded: dict, now: dict) -> list[str]:
    """What differs between the config a finished output recorded and the config now asking for it, as
    'key: recorded -> now'; HOW_NOT_WHAT keys are left out, and so are hub ids now (the output recorded the
    cached snapshot dir they resolved to)."""
    from train.models.hub import is_hub_id

    return config_changes(recorded, now, lambda key, value: key in HOW_NOT_WHAT or (
        isinstance(value, str) and bool(value) and is_hub_id(value)))


def write_done(out_dir: str | Path, config: Any, inputs: dict[str, str], metrics: dict, stage: str) -> Path:
    """Write DONE.json atomically (temp + fsync + rename) so a crash never leaves a half manifest."""
    out = Path(out_dir)
    record = {"stage": stage, "version": __version__, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": config, "inputs": inputs, "metrics": metrics}
    tmp = out / f".{DONE}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=1, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / DONE)
    return out / DONE


def read_done(out_dir: str | Path) -> dict | None:
    """The DONE.json of `out_dir`, None if there is none; a damaged one is an error that names it."""
    p = Path(out_dir) / DONE
    if not p.is_file():
        return None
    try:
        done = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise TdgError(f"{p}: unreadable ({e}); delete it to run that stage again") from None
    if not isinstance(done, dict):
        raise TdgError(f"{p}: not a DONE.json (no JSON object); delete it to run that stage again")
    return done


def check_stage_output(path: str | Path, key: str, stages: tuple[str, ...], required: bool = True) -> None:
    """Refuse an input written by another stage than `stages` (e.g. a distill output given as nat.neg_adapter).
    Outputs of versions that did not record their stage pass; without `required`, so does a directory with no
    DONE.json (an adapter made elsewhere)."""
    if not Path(path).exists():
        raise TdgError(f"{key}: {path} does not exist; expected the output of stage {' or '.join(stages)}")
    done = read_done(path)
    if done is None:
        if not required:
            return
        raise TdgError(f"{key}: {path} is not a finished stage output (no {DONE}); "
                       f"expected the output of stage {' or '.join(stages)}")
    stage = done.get("stage")
    if stage is not None and stage not in stages:
        raise TdgError(f"{key}: {path} is the output of stage {stage}, not of stage {' or '.join(stages)}")
