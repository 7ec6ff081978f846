"""One place to change a run: run.yaml shared values, ${name} interpolation, pipeline overrides and --dry-run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import NegConfig, ScoreConfig, load_config
from train.errors import ConfigError
from train.pipeline import overrides_for

REPO = Path(__file__).resolve().parents[1]


def write(d: Path, name: str, data: dict | str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return d / name


@pytest.fixture
def cfg_dir(tmp_path) -> Path:
    d = tmp_path / "cfg"
    write(d, "run.yaml", "base_model: /models/a\nrun_dir: runs/x\nprepared: ${run_dir}/prepared\nlr: 2.0e-4\n")
    write(d, "neg.yaml", "model: {path: '${base_model}'}\ndata: {path: '${prepared}'}\n"
                         "optim: {lr: '${lr}'}\nengine: {output_dir: '${run_dir}/neg'}\n")
    write(d, "score.yaml", "data: {path: '${prepared}'}\nscore: {nat_dir: '${run_dir}/nat'}\n"
                           "engine: {output_dir: '${run_dir}/score'}\n")
    return d


def test_shared_values_interpolate_keep_their_type_and_are_overridden_in_one_place(cfg_dir):
    cfg = load_config(NegConfig, cfg_dir / "neg.yaml")
    assert (cfg.model.path, cfg.data.path, cfg.engine.output_dir) == ("/models/a", "runs/x/prepared", "runs/x/neg")
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    cfg = load_config(NegConfig, cfg_dir / "neg.yaml", ["run_dir=/scratch/r", "base_model=org/name", "optim.lr=1e-3"])
    assert (cfg.model.path, cfg.data.path, cfg.engine.output_dir, cfg.optim.lr) == \
        ("org/name", "/scratch/r/prepared", "/scratch/r/neg", 1e-3)
    # a dotted override still beats the shared value it replaces
    assert load_config(NegConfig, cfg_dir / "neg.yaml", ["model.path=/m"]).model.path == "/m"


def test_interpolation_keeps_typed_errors(cfg_dir, monkeypatch):
    write(cfg_dir, "bad.yaml", "model: {path: '${base_modle}'}\nengine: {output_dir: o}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.path: Interpolation key 'base_modle' not found "
                                          r"\(shared values from run\.yaml: base_model, run_dir, prepared, lr\)"):
        load_config(NegConfig, cfg_dir / "bad.yaml")
    with pytest.raises(ConfigError, match=r"optim\.lr: value 'runs/x' has the wrong type; expected float"):
        load_config(NegConfig, cfg_dir / "neg.yaml", ["lr=${run_dir}"])
    with pytest.raises(ConfigError, match="unknown key base_modle"):
        load_config(NegConfig, cfg_dir / "neg.yaml", ["base_modle=/x"])
    write(cfg_dir, "run.yaml", "data: /d\n")
    with pytest.raises(ConfigError, match="data is also a config section"):
        load_config(NegConfig, cfg_dir / "neg.yaml")
    monkeypatch.setenv("TDG_TEST_SCRATCH", "/scratch/env")
    write(cfg_dir, "run.yaml", "run_dir: ${oc.env:TDG_TEST_SCRATCH}/r\nbase_model: m\nprepared: p\nlr: 1.0\n")
    assert load_config(NegConfig, cfg_dir / "neg.yaml").engine.output_dir == "/scratch/env/r/neg"


def test_each_stage_gets_the_overrides_that_are_for_it(cfg_dir):
    overrides = ["run_dir=/r", "optim.lr=1e-3", "score.top_k=8"]
    assert overrides_for("neg", cfg_dir / "neg.yaml", overrides) == ["run_dir=/r", "optim.lr=1e-3"]
    assert overrides_for("score", cfg_dir / "score.yaml", overrides) == ["run_dir=/r", "score.top_k=8"]
    assert load_config(ScoreConfig, cfg_dir / "score.yaml", ["run_dir=/r", "score.top_k=8"]).score.top_k == 8
    with pytest.raises(ConfigError, match="override 'ranker.loss=pairwise' is for no stage config"):
        overrides_for("neg", cfg_dir / "neg.yaml", ["ranker.loss=pairwise"])


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """slurm/pipeline.sh --dry-run with an `sbatch` on PATH that records any call (there must be none)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "sbatch").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'sbatch_called'}\necho 1\n")
    (fake / "sbatch").chmod(0o755)
    python = fake / "python"  # counts the Python processes the dry run starts
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "python_calls"}\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TDG_PYTHON": str(python), "TDG_PLAN": "0"}
    return subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), "--dry-run", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def stage_blocks(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):\n((?:  .*\n)+)", stdout, re.M))


@pytest.mark.slow
def test_dry_run_over_llama7b_with_one_base_model_override_changes_every_model_path(tmp_path):
    r = dry_run(tmp_path, str(REPO / "configs" / "llama7b"), "-N", "1", "--ntasks-per-node", "8", "--",
                "base_model=mistralai/Mistral-7B-v0.1", "run_dir=/scratch/me/run1", "optim.lr=2e-4")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "sbatch_called").exists() and "dry run: nothing submitted" in r.stdout
    blocks = stage_blocks(r.stdout)
    assert list(blocks) == ["sft", "neg", "nat", "score", "distill", "ranker", "eval"]
    for stage, block in blocks.items():
        sbatch_line = block.splitlines()[0]
        assert sbatch_line.startswith("  sbatch ") and f"slurm/{stage}.sbatch" in sbatch_line
        assert "base_model=mistralai/Mistral-7B-v0.1" in sbatch_line
        assert ("optim.lr=2e-4" in sbatch_line) == (stage not in ("score", "eval"))  # only the training stages
        assert re.search(r"engine\.output_dir: /scratch/me/run1/", block), block
        if stage not in ("score", "eval"):
            assert "model.path: mistralai/Mistral-7B-v0.1\n" in block, block
    assert "eval.model: /scratch/me/run1/distill" in blocks["eval"]
    # one Python process resolves every stage (besides the check that this Python imports the trainer): the
    # dry run took 28-45 s when each stage started two
    calls = (tmp_path / "python_calls").read_text().splitlines()
    assert len(calls) == 2 and calls[1].startswith("-m train pipeline-stages --into"), calls
    # without the override, the run.yaml values
    r = dry_run(tmp_path, str(REPO / "configs" / "llama7b"))
    assert "model.path: /models/llama-7b" in stage_blocks(r.stdout)["neg"]
    # a misspelt override stops the pipeline before anything is submitted
    r = dry_run(tmp_path, str(REPO / "configs" / "llama7b"), "--", "optim.lrr=2e-4")
    assert r.returncode == 2 and "unknown key optim.lrr" in r.stderr
    r = dry_run(tmp_path, str(REPO / "configs" / "llama7b"), "--", "base_modle=x")
    assert r.returncode == 2 and "'base_modle=x' is for no stage config" in r.stderr
    assert not (tmp_path / "sbatch_called").exists()


def test_the_slurm_scripts_find_python_without_a_venv_and_name_what_they_tried(tmp_path):
    """No .venv in the checkout: python3 on PATH (an environment tdg-trainer is installed in); a TDG_PYTHON
    that cannot import the trainer is named, instead of ".venv/bin/python: No such file"."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this environment's python
    (fake_bin / "python3").chmod(0o755)
    broken = fake_bin / "broken-python"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    checkout = tmp_path / "checkout"  # no .venv here
    checkout.mkdir()

    def tdg_python(**env):
        script = f'. "{REPO / "slurm" / "python.sh"}"; tdg_python "{checkout}"'
        return subprocess.run(["bash", "-c", script], env={"PATH": f"{fake_bin}:/usr/bin:/bin", **env},
                              capture_output=True, text=True, timeout=60)

    found = tdg_python()
    assert found.returncode == 0 and found.stdout.strip() == str(fake_bin / "python3"), found.stderr
    refused = tdg_python(TDG_PYTHON=str(broken))
    assert refused.returncode == 2 and f"tried {broken}" in refused.stderr and "set TDG_PYTHON" in refused.stderr
    assert tdg_python(TDG_PYTHON=sys.executable).stdout.strip() == sys.executable
