"""Resume: find the newest checkpoint every rank finds intact, check it was trained under this recipe and
this DeepSpeed layout, load it, and fall back to an older one when a load fails (setting the failed one
aside, so no later run picks it again). Only content damage sets a checkpoint aside; a changed recipe or
layout stops the run and names the setting.
"""

from __future__ import annotations

from pathlib import Path

from train.engine import checkpoint as ckpt
from train.engine import distributed as dist_
from train.errors import TdgError
from train.manifest import config_changes


def next_intact(candidates, root: Path, name: str) -> ckpt.Position | None:
    """The next checkpoint (newest first) whose recorded files every rank found intact. A damaged one is named in
    the log and set aside (COMPLETE.json renamed), so neither this run nor a later one picks it again."""
    for candidate in candidates:
        problems = [p for p in dist_.all_gather_object(
            ckpt.check_my_files(root / candidate.tag, dist_.rank(), dist_.world())) if p]
        if not problems:
            return candidate
        set_aside(root, candidate, problems[0], name)
    return None


def set_aside(root: Path, pos: ckpt.Position, problem: str, name: str) -> None:
    if dist_.is_main():
        print(f"[{name}] checkpoint {root / pos.tag} is unusable ({problem}); falling back to the next older "
              "complete checkpoint, if any", flush=True)
        complete = root / pos.tag / ckpt.COMPLETE
        complete.rename(complete.with_name(ckpt.COMPLETE + ".unusable"))
    dist_.barrier()


# what a changed input digest means, in the user's words
INPUT_NAMES = {"inputs.weights": "the weights at model.path (by content)",
               "inputs.prepared": "the prepared data at data.path (by content)"}


def check_layout(root: Path, pos: ckpt.Position, layout: dict, ds_config: str) -> None:
    """A checkpoint saved under another ZeRO stage cannot load under this one. That is a setting to put back,
    not damage: stop and name it, and keep the checkpoint (a failed load would set it aside as unusable)."""
    saved = (ckpt.read_record(root / pos.tag) or {}).get("layout") or {}
    diffs = [f"{key} {saved[key]} when saved, {value} now" for key, value in layout.items()
             if key in saved and saved[key] != value]
    if diffs:
        raise TdgError(f"{root / pos.tag} was saved under another DeepSpeed layout ({'; '.join(diffs)}; "
                       f"engine.ds_config={ds_config}). Resume with the ds_config it was saved under; "
                       "the checkpoint is kept")


def recipe_changes(root: Path, resume: ckpt.Position | None, recipe: dict, cfg, name: str) -> list[str]:
    """Refuse to resume under a changed training recipe (naming what changed) unless the config allows it."""
    if resume is None:
        return []
    saved = (ckpt.read_record(root / resume.tag) or {}).get("recipe") or {}
    # inputs are compared where both recorded them (an older version recorded others, by path)
    common = set(saved.get("inputs") or {}) & set(recipe.get("inputs") or {})
    changes = config_changes({**saved, "inputs": {k: saved["inputs"][k] for k in common}},
                             {**recipe, "inputs": {k: recipe["inputs"][k] for k in common}}) if saved else []
    changes = [INPUT_NAMES.get(c.split(":")[0], c.split(":")[0]) + ":" + c.split(":", 1)[1] for c in changes]
    if changes and not cfg.engine.resume_changed_config:
        raise TdgError(f"{root / resume.tag} was trained under another config: {'; '.join(changes)}. Resuming "
                       "would continue the old run under new settings; use a new engine.output_dir, or set "
                       "engine.resume_changed_config=true to continue anyway (DONE.json then records both)")
    if changes and dist_.is_main():
        print(f"[{name}] resuming under a changed config (engine.resume_changed_config): {'; '.join(changes)}",
              flush=True)
    return changes


def load_with_fallback(engine, root: Path, resume: ckpt.Position, changed: list[str], candidates, world: int,
                       universal: bool, recipe: dict, cfg, layout: dict, name: str) -> tuple[ckpt.Position, list[str]]:
    """Load `resume` (trained under the recipe `changed` describes) into the engine, converted to this world
    size if `universal`; if any rank fails, set it aside and fall back to the next older intact checkpoint of the
    same kind. Returns the checkpoint loaded and its recipe changes. Stops when none loads: the model may be
    partly loaded."""
    failures: list[str] = []
    while True:
        tag = resume.tag
        if universal:
            if dist_.is_main():
                tag = ckpt.to_universal(root, resume)
            tag = dist_.broadcast_object(tag)
        problem = None
        try:
            load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
            if load_path is None:
                problem = f"{root / tag}: DeepSpeed found nothing to load"
        except Exception as e:  # noqa: BLE001 -- whatever broke the load, an older checkpoint may still do
            problem = f"{root / tag}: loading failed: {type(e).__name__}: {e}"
        problems = [p for p in dist_.all_gather_object(problem) if p]
        if not problems:
            if dist_.is_main():
                how = f" (converted from {resume.world_size} to {world} ranks)" if universal else ""
                print(f"[{name}] resumed from {root / resume.tag} at step {resume.global_step}{how}", flush=True)
            return resume, changed
        failures.append(problems[0])
        set_aside(root, resume, problems[0], name)
        older = next_intact(candidates, root, name)
        if older is None or (older.world_size != world) != universal:
            raise TdgError(f"{root}: no checkpoint could be loaded ({'; '.join(failures)}); the model may be "
                           "partly loaded, so this run stops instead of training from the start")
        changed = recipe_changes(root, older, recipe, cfg, name)
        check_layout(root, older, layout, cfg.engine.ds_config)
        resume = older
