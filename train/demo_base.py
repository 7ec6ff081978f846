"""The demo's pre-trained base, shipped in `configs/tiny/base`: `tdg demo` installs it instead of spending
15 minutes (on 2 cores) pre-training when it would pre-train exactly that base, as a real run starts from a
downloaded base model.

"Exactly that base" is checked, not assumed: the shipped `base.json` records what it was trained from and
under, and the demo compares it with its own before installing.
  - the pre-training data (sha256 of the generated `raw/pretrain` files),
  - the tokenizer (its vocabulary: a sentencepiece version that trains other pieces changes it),
  - the initial weights (their tensors, whatever the file's metadata),
  - the stage recipe (`pretrain.yaml` with the demo's overrides, paths left out) and the world size.
Any difference, or `--train-base`, pre-trains here, and the demo says which of these differed.
`tools/publish_demo_base.py` writes a demo's own pre-trained base there (after a change to the data, the
model or the recipe).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from train.engine.checkpoint import recipe_of
from train.errors import TdgError
from train.manifest import config_changes, dir_digest, read_done, write_done

IDENTITY = "base.json"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")


def vocab_digest(tokenizer_dir: Path) -> str:
    """The tokenizer by its pieces and ids, not its file (whose layout changes between `tokenizers` versions)."""
    from train.data.tokenizer import load_tokenizer

    vocab = sorted(load_tokenizer(tokenizer_dir).get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def tensors_digest(model_dir: Path) -> str:
    """A model's weights by tensor name, dtype, shape and bytes."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity(demo_out: Path, config: dict, world_size: int) -> dict:
    """What decides the base a demo dir pre-trains: its data, tokenizer, initial weights, recipe and ranks."""
    return {"pretrain_data": dir_digest(demo_out / "raw" / "pretrain"),
            "tokenizer_vocab": vocab_digest(demo_out / "tokenizer"),
            "initial_weights": tensors_digest(demo_out / "base_init"),
            "recipe": recipe_of(config, {})["config"], "world_size": world_size}


def read_shipped(base: Path) -> dict | None:
    """The shipped base's record, None when `base` holds none."""
    p = base / IDENTITY
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise TdgError(f"{p}: unreadable ({e})") from None


DIGESTS = {"pretrain_data": "the pre-training data (raw/pretrain) differs",
           "tokenizer_vocab": "the tokenizer's vocabulary differs",
           "initial_weights": "the initial weights (base_init) differ"}


def identity_changes(shipped: dict, now: dict) -> list[str]:
    """What differs between the shipped base's identity and this demo's: the digests in words, the recipe and
    world size as 'key: shipped -> now'."""
    changes = config_changes(shipped["identity"], now)
    return [DIGESTS.get(c.split(":")[0], c) for c in changes]


def install(base: Path, shipped: dict, dest: Path, config: dict) -> None:
    """Copy the shipped base, checked against its recorded weights, into the demo's pre-training output dir, with
    a DONE.json of this demo's `config` (the shipped recipe with this demo's paths) that says where the base came
    from; its metrics are those of the run that trained it."""
    if tensors_digest(base) != shipped["weights"]:
        raise TdgError(f"{base / 'model.safetensors'}: its weights differ from those {base / IDENTITY} records "
                       "(damaged or replaced); restore it (git checkout) or run tdg demo --train-base")
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(base / name, dest / "model" / name)
    done = shipped["done"]
    write_done(dest, config=config, inputs=done["inputs"],
               metrics={**done["metrics"], "model": str(dest / "model"), "shipped_from": str(base)},
               stage=done["stage"])


def publish(demo_out: Path, dest: Path) -> dict:
    """Write `demo_out`'s pre-trained base (trained here, not installed) and its identity to `dest`."""
    done = read_done(demo_out / "pretrain")
    if done is None:
        raise TdgError(f"{demo_out / 'pretrain'}: no DONE.json; run tdg demo --train-base --output {demo_out} first")
    if "shipped_from" in done["metrics"]:
        raise TdgError(f"{demo_out / 'pretrain'}: installed from {done['metrics']['shipped_from']}, not pre-trained "
                       f"here; run tdg demo --train-base into a new --output dir")
    record = {"identity": identity(demo_out, done["config"], done["metrics"]["world_size"]),
              "weights": tensors_digest(demo_out / "pretrain" / "model"), "done": done}
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(demo_out / "pretrain" / "model" / name, dest / name)
    (dest / IDENTITY).write_text(json.dumps(record, indent=1) + "\n")
    return record
