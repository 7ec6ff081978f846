"""The sbatch scripts on a real Slurm (single node, started by the test): pipeline, preemption, failure."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
STEPS = 12


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm: {e}")
    yield cluster
    cluster.stop()


def _write_configs(d: Path, prepared, base, out_root: Path, neg_extra: dict | None = None, full: bool = False,
                   test: Path | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    common = {"model": {"path": str(base)},
              "data": {"path": str(prepared), "max_len": 384, "max_tokens": 2048},
              "optim": {"lr": 5e-3, "warmup_steps": 2, "epochs": 5, "max_steps": STEPS}}
    neg = {**common, "engine": {"output_dir": str(out_root / "neg"), "ds_config": "zero3", "save_every": 2,
                                "progress": False}}
    for k, v in (neg_extra or {}).items():
        neg.setdefault(k, {}).update(v)
    nat = {**common, "nat": {"neg_adapter": str(out_root / "neg"), "gate_dim": 16},
           "engine": {"output_dir": str(out_root / "nat"), "ds_config": "zero3", "progress": False}}
    (d / "neg.yaml").write_text(yaml.safe_dump(neg))
    (d / "nat.yaml").write_text(yaml.safe_dump(nat))
    if full:  # the rest of the chain: score, distill, ranker, eval (a few steps each)
        eng = {"ds_config": "zero3", "progress": False}
        stages = {
            "score": {"data": common["data"], "score": {"nat_dir": str(out_root / "nat"), "top_k": 8},
                      "engine": {"output_dir": str(out_root / "score"), "ds_config": "zero3", "progress": False}},
            "distill": {**common, "distill": {"scores": str(out_root / "score")},
                        "engine": {**eng, "output_dir": str(out_root / "distill")}},
            "ranker": {**common, "engine": {**eng, "output_dir": str(out_root / "ranker")}},
            "eval": {"eval": {"model": str(out_root / "distill"), "test": str(test), "ranker": str(out_root / "ranker"),
                              "n": 2, "max_new_tokens": 8, "max_questions": 4},
                     "engine": {"output_dir": str(out_root / "eval"), "progress": False}},
        }
        for name, cfg in stages.items():
            (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _env():
    return {"TDG_DEVICE": "cpu", "TDG_PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}


def _submit_pipeline(slurm, config_dir: Path, *overrides: str) -> dict[str, str]:
    r = slurm.run(["bash", str(REPO / "slurm" / "pipeline.sh"), str(config_dir), "--nodes=1", "--ntasks=2",
                   "--", *overrides], cwd=str(REPO), env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(re.findall(r"^(\w+): job (\d+) ->", r.stdout, re.M))


def _log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.out")))


def test_pipeline_runs_every_stage_through_its_sbatch_script(slurm, tmp_path, prepared_dir, base_model_dir,
                                                             synthetic_raw):
    out = tmp_path / "runs"
    show_progress = {"engine": {"progress": True}}
    cfg = _write_configs(tmp_path / "cfg", prepared_dir, base_model_dir, out, full=True, test=synthetic_raw / "test",
                         neg_extra=show_progress)
    # every stage refers to a shared ${run_dir}, whose run.yaml value is wrong: the override fixes it everywhere
    for f in cfg.glob("*.yaml"):
        f.write_text(f.read_text().replace(str(out), "${run_dir}"))
    (cfg / "run.yaml").write_text("run_dir: /nonexistent/runs\n")
    jobs = _submit_pipeline(slurm, cfg, f"run_dir={out}")
    assert list(jobs) == ["neg", "nat", "score", "distill", "ranker", "eval"]
    for stage, job in jobs.items():
        assert slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", _log(out / stage)
        assert (out / stage / "DONE.json").is_file()
        assert f"stage {stage}, restart count 0" in _log(out / stage)
    assert json.loads((out / "neg" / "DONE.json").read_text())["metrics"]["world_size"] == 2
    neg_log = _log(out / "neg")  # progress in a job log: readable lines, not tqdm's carriage-return redraws
    assert "\r" not in neg_log and f"neg: 100% {STEPS}/{STEPS}" in neg_log and f"[neg] done: step {STEPS}" in neg_log
    # resubmitting the finished pipeline is safe: every stage sees DONE.json and exits 0 at once
    again = _submit_pipeline(slurm, tmp_path / "cfg", f"run_dir={out}")
    for stage, job in again.items():
        assert slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
        assert _log(out / stage).count("already has DONE.json") == 1  # said by rank 0 alone


def test_preempted_job_requeues_and_ends_with_the_uninterrupted_adapter(slurm, tmp_path, prepared_dir,
                                                                        base_model_dir):
    ref_out, pre_out = tmp_path / "ref", tmp_path / "pre"
    ref_cfg = _write_configs(tmp_path / "ref_cfg", prepared_dir, base_model_dir, ref_out)
    pre_cfg = _write_configs(tmp_path / "pre_cfg", prepared_dir, base_model_dir, pre_out)
    (ref_cfg / "nat.yaml").unlink()
    (pre_cfg / "nat.yaml").unlink()
    ref = _submit_pipeline(slurm, ref_cfg)["neg"]
    assert slurm.wait_for(ref, {"COMPLETED", "FAILED"}) == "COMPLETED", _log(ref_out / "neg")

    job = _submit_pipeline(slurm, pre_cfg)["neg"]
    deadline = time.time() + 300
    while not list((pre_out / "neg" / "checkpoints").glob("step*/COMPLETE.json")):
        assert time.time() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING"), _log(pre_out / "neg")
        time.sleep(0.1)
    # what Slurm does before a time limit with --signal=B:USR1@N: signal the batch script only
    r = slurm.run(["scancel", "--signal=USR1", "--batch", job])
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 300
    while "requeueing job" not in _log(pre_out / "neg"):
        assert time.time() < deadline, _log(pre_out / "neg")
        time.sleep(0.2)
    assert slurm.wait_for(job, {"PENDING"}, timeout=120) == "PENDING"
    # Slurm holds a requeued job back ~120 s; release it sooner, but not in the same second the
    # old credential was revoked (slurmd would refuse the launch: "Job credential revoked").
    time.sleep(3)
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    assert slurm.wait_for(job, {"COMPLETED", "FAILED"}) == "COMPLETED", _log(pre_out / "neg")
    log = _log(pre_out / "neg")
    assert "USR1 received" in log and "restart count 1" in log and "resumed from" in log
    final = load_file(pre_out / "neg" / "adapter" / "adapter_model.safetensors")
    reference = load_file(ref_out / "neg" / "adapter" / "adapter_model.safetensors")
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-6)


def test_bad_config_fails_fast_and_dependents_never_run(slurm, tmp_path, prepared_dir, base_model_dir):
    out = tmp_path / "runs"
    cfg = _write_configs(tmp_path / "cfg", prepared_dir, base_model_dir, out,
                         neg_extra={"lora": {"target_modules": ["q_proj", "foo_proj"]}})
    t0 = time.time()
    jobs = _submit_pipeline(slurm, cfg)
    assert slurm.wait_for(jobs["neg"], {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
    assert time.time() - t0 < 120
    log = _log(out / "neg")
    assert "lora.target_modules: foo_proj not in the model" in log and "Traceback" not in log
    deadline = time.time() + 60
    while slurm.job_state(jobs["nat"]) == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert slurm.job_state(jobs["nat"]) in ("CANCELLED", "UNKNOWN")
    assert not (out / "nat" / "DONE.json").exists() and not list((out / "nat" / "logs").glob("*.out"))


def test_launcher_usage_error_without_config(slurm, tmp_path):
    r = subprocess.run(["bash", str(REPO / "slurm" / "neg.sbatch")], capture_output=True, text=True,
                       env={"SLURM_SUBMIT_DIR": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "usage: sbatch" in r.stderr


def test_ablation_job_is_preempted_mid_stage_and_requeued_run_finishes_the_table(slurm, tmp_path, prepared_dir,
                                                                                 base_model_dir, synthetic_raw):
    """USR1 goes batch script -> srun -> tdg ablation -> torchrun -> both workers, which checkpoint."""
    cfg_dir = _write_configs(tmp_path / "cfg", prepared_dir, base_model_dir, tmp_path / "unused", full=True,
                             test=synthetic_raw / "test")
    sft = {"model": {"path": str(base_model_dir)},
           "data": {"path": str(prepared_dir), "max_len": 384, "max_tokens": 2048},
           "optim": {"lr": 5e-3, "warmup_steps": 2, "epochs": 5, "max_steps": 3 * STEPS},
           "engine": {"output_dir": "unused", "ds_config": "zero3", "save_every": 2, "progress": False}}
    (cfg_dir / "sft.yaml").write_text(yaml.safe_dump(sft))
    out = tmp_path / "ablation"
    ablation = {"ablation": {"configs": str(cfg_dir), "variants": ["sft-pos"], "seeds": [0], "nproc": 2,
                             "base_model": str(base_model_dir), "data": str(prepared_dir),
                             "test": str(synthetic_raw / "test")},
                "engine": {"output_dir": str(out)}}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(ablation))
    (tmp_path / "logs").mkdir()
    r = slurm.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=1", f"--output={tmp_path}/logs/%x-%j.out",
                   str(REPO / "slurm" / "ablation.sbatch"), str(tmp_path / "ablation.yaml")],
                  cwd=str(REPO), env=_env())
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    stage_dir = out / "seed0" / "sft-pos"
    deadline = time.time() + 300
    while not list((stage_dir / "checkpoints").glob("step*/COMPLETE.json")):
        assert time.time() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING"), _log(tmp_path)
        time.sleep(0.1)
    assert slurm.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    deadline = time.time() + 300
    while "requeueing job" not in _log(tmp_path):
        assert time.time() < deadline, _log(tmp_path)
        time.sleep(0.2)
    assert not (stage_dir / "DONE.json").exists()  # stopped mid-stage, not finished
    assert slurm.wait_for(job, {"PENDING"}, timeout=120) == "PENDING"
    time.sleep(3)
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    assert slurm.wait_for(job, {"COMPLETED", "FAILED"}) == "COMPLETED", _log(tmp_path)
    log = _log(tmp_path)
    assert "stopped on request" in log and "restart count 1" in log and "resumed from" in log
    assert json.loads((stage_dir / "DONE.json").read_text())["metrics"]["world_size"] == 2
    assert "| sft-pos |" in (out / "results.md").read_text()
