"""Models by hub id: resolved from a real Hugging Face cache layout built here, with no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_stage, stage_env

from train.errors import ConfigError
from train.models.hub import is_hub_id, resolve_model_ref


def make_cache_entry(hf_home: Path, repo_id: str, model_dir: Path, revision: str = "0" * 40) -> Path:
    """The cache's own layout: blobs/, snapshots/<rev>/ (links into blobs) and refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert is_hub_id("mistralai/Mistral-7B-v0.1") and is_hub_id("org/name@v1.0")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id(str(tmp_path / "org" / "name")) and not is_hub_id("/abs/dir") and not is_hub_id("name")


def test_a_cached_id_resolves_to_its_snapshot_and_a_missing_one_names_id_and_cache(hf_home, base_model_dir):
    snapshot = make_cache_entry(hf_home, "tiny-org/tiny-llama", base_model_dir)
    assert Path(resolve_model_ref("tiny-org/tiny-llama", "model.path")) == snapshot
    assert Path(resolve_model_ref("tiny-org/tiny-llama@" + "0" * 40, "model.path")) == snapshot
    with pytest.raises(ConfigError) as e:
        resolve_model_ref("tiny-org/absent", "model.path")
    assert "model.path: tiny-org/absent" in str(e.value) and str(hf_home / "hub") in str(e.value)
    with pytest.raises(ConfigError, match="at revision v9.*hf download tiny-org/tiny-llama --revision v9`"):
        resolve_model_ref("tiny-org/tiny-llama@v9", "model.path")


@pytest.mark.slow
def test_a_stage_trains_from_a_hub_id_and_records_the_snapshot(hf_home, tmp_path, prepared_dir, base_model_dir,
                                                              monkeypatch):
    snapshot = make_cache_entry(hf_home, "tiny-org/tiny-llama", base_model_dir)
    out = tmp_path / "neg"
    proc = run_stage("neg", ["--config", "configs/tiny/neg.yaml", "model.path=tiny-org/tiny-llama",
                             f"data.path={prepared_dir}", f"engine.output_dir={out}", "optim.max_steps=2"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())["model"]["path"]
    assert Path(recorded) == snapshot
    assert Path(json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]) == \
        snapshot
    # eval --model takes the id too
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"problem": "What is $1+1$?", "solution": "$\\boxed{2}$"}) + "\n")
    proc = run_stage("eval", ["--model", "tiny-org/tiny-llama", "--test", str(test), "--num-samples", "2",
                              "--output", str(tmp_path / "eval"), "eval.max_new_tokens=4", "engine.progress=false"],
                     nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())["eval"]["model"]) == snapshot
    assert f"[eval] wrote {(tmp_path / 'eval').resolve()}: metrics.md" in proc.stdout  # where the results are
    # the same id, absent from the cache the job reads: a one-line error, not a hub traceback
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty" / "hub"))
    proc = run_stage("neg", ["--config", "configs/tiny/neg.yaml", "model.path=tiny-org/tiny-llama",
                             f"data.path={prepared_dir}", f"engine.output_dir={tmp_path / 'neg2'}"], nproc=1)
    assert proc.returncode != 0
    assert "model.path: tiny-org/tiny-llama is not a local directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert stage_env()["HF_HOME"] == str(tmp_path / "empty")
