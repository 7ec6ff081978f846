"""The demo's shipped base (train.demo_base): installed only when the demo would pre-train exactly that base."""

import json
import shutil

import pytest

from train import demo_base
from train.demo_options import SHIPPED_BASE, DemoOptions
from train.errors import TdgError
from train.launch import _finished
from train.manifest import read_done
from train.stages.demo import CONFIGS, base_identity, prepare_base, prepare_inputs, pretrain_config, pretrain_overrides

STALE = ("the shipped base is not what the default demo pre-trains now; rebuild it: tdg demo --train-base --output "
         "DIR, then python tools/publish_demo_base.py DIR")


def test_the_default_demo_installs_the_shipped_base_and_names_what_would_change_it(tmp_path):
    out = tmp_path / "demo"
    opts = DemoOptions(output=str(out), workers=1)
    prepare_inputs(opts, out)
    shipped = demo_base.read_shipped(SHIPPED_BASE)
    assert shipped is not None, f"no {demo_base.IDENTITY} in {SHIPPED_BASE}"
    assert demo_base.identity_changes(shipped, base_identity(opts, out)) == [], STALE
    # the shipped model is the one recorded: its tokenizer is the demo's, its weights the run's
    assert demo_base.vocab_digest(SHIPPED_BASE) == shipped["identity"]["tokenizer_vocab"]
    assert demo_base.tensors_digest(SHIPPED_BASE) == shipped["weights"]

    prepare_base(opts, out)  # installs: no pre-training stage runs (it would take 15 minutes)
    done = read_done(out / "pretrain")
    assert done["metrics"]["shipped_from"] == str(SHIPPED_BASE) and not (out / "pretrain" / "checkpoints").exists()
    assert done["config"] == pretrain_config(opts, out)  # this demo's paths: the stage itself would skip too
    assert _finished("sft", CONFIGS / "pretrain.yaml", pretrain_overrides(opts, out))
    for name in demo_base.MODEL_FILES:
        assert (out / "pretrain" / "model" / name).read_bytes() == (SHIPPED_BASE / name).read_bytes(), name
    prepare_base(opts, out)  # a rerun keeps the installed base
    assert read_done(out / "pretrain")["finished_at"] == done["finished_at"]
    with pytest.raises(TdgError, match=r"holds the base installed from .*, and --train-base asks to pre-train one"):
        prepare_base(DemoOptions(output=str(out), workers=1, train_base=True), out)
    with pytest.raises(TdgError, match="installed from .* not pre-trained here"):
        demo_base.publish(out, tmp_path / "republished")

    damaged = tmp_path / "damaged"
    shutil.copytree(SHIPPED_BASE, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TdgError, match="model.safetensors: its weights differ from those .*base.json records"):
        demo_base.install(damaged, shipped, tmp_path / "other" / "pretrain", {})

    # what differs is named: recipe keys and world size by value, the inputs in words
    assert demo_base.identity_changes(shipped, base_identity(DemoOptions(output=str(out), pretrain_epochs=1,
                                                                          nproc=1), out)) == [
        "recipe.optim.epochs: 2 -> 1", "world_size: 2 -> 1"]
    gold = out / "raw" / "pretrain" / "gold.jsonl"
    first = json.loads(gold.read_text().splitlines()[0])
    gold.write_text(json.dumps({**first, "question": first["question"] + " "}) + "\n" + gold.read_text())
    assert demo_base.identity_changes(shipped, base_identity(opts, out)) == [
        "the pre-training data (raw/pretrain) differs"]
