"""Integrity under faults: damaged checkpoints fall back, damaged scores are refused or redone, one run per
output dir, no resume under a changed recipe, inputs checked for what they are, bad input and full disks
named. Every case here ended in a traceback or in a silent success on damaged data before."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_stage, stage_cmd, stage_env
from train.data.prepare import PrepareOptions, prepare
from train.errors import InputError, TdgError

pytestmark = pytest.mark.slow
STEPS = 8


def _neg_args(prepared, base, out, ds, *extra) -> list[str]:
    return [f"model.path={base}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "optim.lr=5e-3", "optim.warmup_steps=2", "optim.epochs=5", f"optim.max_steps={STEPS}",
            "engine.save_every=2", "engine.keep_last=3", f"engine.ds_config={ds}", "engine.progress=false",
            f"engine.output_dir={out}", *extra]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prepared_dir, base_model_dir, zero3_partitioned):
    """A finished 2-rank ZeRO-3 neg run with checkpoints at steps 4, 6 and 8 (the last is the end)."""
    out = tmp_path_factory.mktemp("integrity") / "neg"
    _ok(run_stage("neg", _neg_args(prepared_dir, base_model_dir, out, zero3_partitioned)))
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step4", "step6", "step8"]
    return out


def _resumable_copy(finished: Path, where: Path) -> Path:
    """The finished run's checkpoints without its result, as if it had stopped right after step 8."""
    out = where / "neg"
    shutil.copytree(finished, out)
    (out / "DONE.json").unlink()
    shutil.rmtree(out / "adapter")
    return out


def _overwrite_16_values(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(struct.pack("<16f", *([1000.0] * 16)))
    assert path.stat().st_size == size


def _damaged_before_it_was_recorded(d: Path) -> None:
    """A file broken before its hash was taken: the record matches, only the load can tell."""
    from train.manifest import file_digest

    path = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:500])
    record = json.loads((d / "COMPLETE.json").read_text())
    record["files"][path.name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    (d / "COMPLETE.json").write_text(json.dumps(record))


DAMAGE = {
    "deleted optimizer shard": lambda d: (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
    "truncated model file": lambda d: (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes()[:1000]),
    "deleted model file": lambda d: (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink(),
    "16 optimizer values overwritten": lambda d: _overwrite_16_values(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "garbled COMPLETE.json": lambda d: (d / "COMPLETE.json").write_text('{"global_step": 8, "epo'),
    "damaged before it was recorded (the load fails)": _damaged_before_it_was_recorded,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_and_ends_as_an_intact_run(
        damage, finished, tmp_path, prepared_dir, base_model_dir, zero3_partitioned):
    out = _resumable_copy(finished, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "step8")
    result = run_stage("neg", _neg_args(prepared_dir, base_model_dir, out, zero3_partitioned))
    _ok(result)
    assert f"resumed from {out / 'checkpoints' / 'step6'} at step 6" in result.stdout
    if damage != "garbled COMPLETE.json":  # an unreadable COMPLETE.json simply makes step8 incomplete
        assert f"checkpoint {out / 'checkpoints' / 'step8'} is unusable" in result.stdout
        reason = result.stdout.split("is unusable")[1].split("\n")[0]
        assert "zero_pp_rank_" in reason or "loading failed" in reason  # the file, or the failed load, is named
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = load_file(finished / "adapter" / "adapter_model.safetensors")
    for k in reference:  # steps 7 and 8 trained again from step 6 give the uninterrupted run's adapter
        torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-6)


def test_an_intact_checkpoint_records_every_file_with_its_size_and_sha256(finished):
    from train.manifest import file_digest

    record = json.loads((finished / "checkpoints" / "step8" / "COMPLETE.json").read_text())
    files = record["files"]
    on_disk = sorted(p.name for p in (finished / "checkpoints" / "step8").iterdir() if p.name != "COMPLETE.json")
    assert sorted(files) == on_disk and len(on_disk) == 4  # model and optimizer states of 2 ranks
    for name, want in files.items():
        path = finished / "checkpoints" / "step8" / name
        assert want == {"size": path.stat().st_size, "sha256": file_digest(path)}
    assert record["recipe"]["config"]["optim"]["lr"] == 5e-3
    assert set(record["recipe"]["inputs"]) == {"prepared", "weights"}


def test_resuming_under_a_changed_recipe_is_refused_naming_what_changed(finished, tmp_path, prepared_dir,
                                                                         base_model_dir, zero3_partitioned):
    out = _resumable_copy(finished, tmp_path)
    args = _neg_args(prepared_dir, base_model_dir, out, zero3_partitioned, "optim.lr=1e-4")
    refused = run_stage("neg", args)
    assert refused.returncode != 0 and "optim.lr: 0.005 -> 0.0001" in refused.stderr, refused.stderr[-2000:]
    assert not (out / "DONE.json").exists()
    allowed = run_stage("neg", [*args, "engine.resume_changed_config=true"])
    _ok(allowed)
    done = json.loads((out / "DONE.json").read_text())
    assert done["config"]["optim"]["lr"] == 1e-4 and done["metrics"]["changed_on_resume"] == [
        "config.optim.lr: 0.005 -> 0.0001"]


def test_a_resume_under_the_wrong_zero_stage_stops_and_keeps_every_checkpoint(finished, tmp_path, prepared_dir,
                                                                             base_model_dir, zero3_partitioned):
    """A ZeRO-3 run resumed with zero2 by mistake used to fail to load, set aside every checkpoint as unusable,
    and lose the run. Now it stops naming the setting, and the right config then resumes."""
    out = _resumable_copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step8")
    wrong = run_stage("neg", _neg_args(prepared_dir, base_model_dir, out, "zero2"))
    assert wrong.returncode != 0, wrong.stdout[-2000:]
    assert "zero_stage 3 when saved, 2 now" in wrong.stderr and "engine.ds_config=zero2" in wrong.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step*/COMPLETE.json*")) == ["COMPLETE.json"] * 2
    right = run_stage("neg", _neg_args(prepared_dir, base_model_dir, out, zero3_partitioned))
    _ok(right)
    assert f"resumed from {out / 'checkpoints' / 'step6'} at step 6" in right.stdout


def _retrained_weights(model: Path) -> None:
    from safetensors.torch import save_file

    weights = load_file(model / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})


def _one_row_fewer(prepared: Path) -> None:
    import pyarrow.parquet as pq

    shard = next(prepared.glob("data-*.parquet"))
    pq.write_table(pq.read_table(shard).slice(1), shard)


@pytest.mark.parametrize("change", ["other weights, same config", "edited prepared data"])
def test_resuming_on_changed_inputs_is_refused_by_content(change, finished, tmp_path, prepared_dir, base_model_dir,
                                                          zero3_partitioned):
    out = _resumable_copy(finished, tmp_path)
    data = shutil.copytree(prepared_dir, tmp_path / "data")
    model = shutil.copytree(base_model_dir, tmp_path / "model")
    if change == "edited prepared data":
        _one_row_fewer(data)
        named = "the prepared data at data.path (by content)"
    else:
        _retrained_weights(model)
        named = "the weights at model.path (by content)"
    refused = run_stage("neg", _neg_args(data, model, out, zero3_partitioned))
    assert refused.returncode != 0 and named in refused.stderr, refused.stderr[-2000:]
    assert not (out / "DONE.json").exists()


def test_resuming_with_only_monitoring_and_memory_settings_changed_continues(finished, tmp_path, prepared_dir,
                                                                            base_model_dir, zero3_partitioned):
    """Loggers, logging cadence, checkpoint retention and gradient checkpointing are not the recipe: a resume
    that changes them continues (the same adapter as the uninterrupted run) instead of being refused."""
    out = _resumable_copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step8")  # steps 7 and 8 train again under the new settings
    moved = shutil.copytree(prepared_dir, tmp_path / "moved" / "data")  # inputs count by content, not path
    args = _neg_args(moved, base_model_dir, out, zero3_partitioned, "engine.report_to=[]",
                     "engine.log_every=3", "engine.keep_last=3", "model.gradient_checkpointing=true")
    result = run_stage("neg", args)
    _ok(result)
    assert f"resumed from {out / 'checkpoints' / 'step6'} at step 6" in result.stdout
    assert "changed_on_resume" not in json.loads((out / "DONE.json").read_text())["metrics"]
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = load_file(finished / "adapter" / "adapter_model.safetensors")
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-5)


def test_every_setting_outside_the_recipe_exists_and_every_other_one_is_guarded():
    from dataclasses import asdict

    from train.config import DistillConfig, NatConfig
    from train.engine.checkpoint import RECIPE_EXCLUDED, recipe_of
    from train.manifest import config_changes

    configs = [asdict(NatConfig()), asdict(DistillConfig())]
    for key in RECIPE_EXCLUDED:  # a misspelt key would guard nothing
        section, _, name = key.partition(".")
        assert any(name in c.get(section, {}) for c in configs), key
    base = asdict(NatConfig())
    for section, values in base.items():
        for name, value in values.items():
            changed = json.loads(json.dumps(base))
            changed[section][name] = [value, "changed"] if not isinstance(value, list) else [*value, "changed"]
            diff = config_changes(recipe_of(base, {})["config"], recipe_of(changed, {})["config"])
            assert (diff == []) == (f"{section}.{name}" in RECIPE_EXCLUDED), f"{section}.{name}"


def test_every_setting_a_finished_output_may_differ_in_exists_and_every_other_one_is_compared():
    from dataclasses import asdict

    from train import config as configs
    from train.manifest import HOW_NOT_WHAT, finished_config_changes
    from train.stage_table import STAGES

    every = [asdict(getattr(configs, spec[2])()) for spec in STAGES.values()]
    for key in HOW_NOT_WHAT:  # a misspelt key would let nothing differ
        section, _, name = key.partition(".")
        assert any(name in c.get(section, {}) for c in every), key
    for base in every:
        for section, values in base.items():
            for name, value in values.items():
                changed = json.loads(json.dumps(base))
                changed[section][name] = ["changed", value]
                diff = finished_config_changes(base, changed)
                assert (diff == []) == (f"{section}.{name}" in HOW_NOT_WHAT), f"{section}.{name}"


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_stop_signal_during_start_up_requeues_instead_of_failing(tmp_path, prepared_dir, base_model_dir):
    """SIGUSR1 (Slurm's warning signal) to one worker while it is still starting up (imports, model load):
    every rank stops at the loop's first check and the job exits 75, to be requeued. The worker used to die
    of it (exit -10), a failure to the launcher, so nothing requeued. The signal goes out as soon as the
    worker has a handler, or after 3 s without one (the model is not loaded by then)."""
    import psutil

    out = tmp_path / "neg"
    proc = subprocess.Popen(stage_cmd("neg", _neg_args(prepared_dir, base_model_dir, out, "zero2")),
                            env=stage_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(workers := [c for c in psutil.Process(proc.pid).children() if "train" in " ".join(c.cmdline())]) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    started = time.time()
    while not _catches(workers[-1].pid, signal.SIGUSR1) and time.time() < started + 3:
        time.sleep(0.005)
    assert not (out / "checkpoints").exists()  # still starting up
    workers[-1].send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=300)
    # torchrun reports its workers' exit codes (srun, as slurm/launch.sh runs them, passes 75 on). A rank still
    # exiting when another has left with 75 may be ended by torchrun itself (SIGTERM, -15); none fails.
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", stdout)}
    assert 75 in codes and codes <= {75, -15}, stdout[-3000:]
    assert "stop requested: checkpointed at step 0; exit 75" in stdout
    assert not (out / "DONE.json").exists()


def test_a_build_killed_midway_leaves_no_lock_that_hangs_the_next_run(tmp_path, prepared_dir, base_model_dir):
    """A build of DeepSpeed's CPU op killed while compiling leaves torch's `lock` file; the next start used to
    wait on it forever, silently. Now it removes the lock (no live build holds the flock), names it, and, as
    no compiler is there either, trains on plain gloo with one warning."""
    ext = tmp_path / "extensions"
    compiler = tmp_path / "slow-c++"  # compiles anything but the op's sources, which take forever
    compiler.write_text('#!/bin/sh\ncase "$*" in *shm*) sleep 600;; esac\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    env = {**stage_env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    build = subprocess.Popen([sys.executable, "-c", "from train.engine.op_build import build_cpu_comm_op as b; b()"],
                             env={**env, "CXX": str(compiler)}, cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock, deadline = ext / "deepspeed_shm_comm" / "lock", time.time() + 180
    while not (lock.exists() and any(p.name() == "sleep" for p in _children(build.pid))):
        assert build.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(build.pid, signal.SIGKILL)  # the build, ninja and the compiler: as preemption kills a job
    build.wait()
    assert lock.exists()
    no_compiler = {**env, "CXX": "/bin/false", "CC": "/bin/false"}
    r = subprocess.run(stage_cmd("neg", _neg_args(prepared_dir, base_model_dir, tmp_path / "neg", "zero2",
                                                  "optim.max_steps=2")),
                       env=no_compiler, capture_output=True, text=True, timeout=300, cwd=REPO)
    _ok(r)
    assert f"removed {lock}" in r.stderr and not lock.exists()
    assert (r.stdout + r.stderr).count("collectives run on plain gloo") == 1, r.stderr[-3000:]


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_plan_export_and_score_without_zero_need_no_compiler(finished, teacher, prepared_dir, tmp_path):
    """As on a login node without a C++ compiler: what does not train builds no DeepSpeed op."""
    ext = tmp_path / "extensions"
    env = {**stage_env(), "CXX": "/bin/false", "CC": "/bin/false", "TORCH_EXTENSIONS_DIR": str(ext)}
    runs = {
        "plan": ["plan", "--config", "configs/llama7b/neg.yaml", "--gpus-per-node", "8"],
        "export": ["export", "--from", str(finished), "--output", str(tmp_path / "merged")],
        "score": ["score", f"score.nat_dir={teacher}", f"data.path={prepared_dir}", "data.max_len=384",
                  "data.max_tokens=2048", "score.shard_size=64", "engine.ds_config=none", "engine.progress=false",
                  f"engine.output_dir={tmp_path / 'score'}"],
    }
    for name, args in runs.items():
        r = subprocess.run([sys.executable, "-m", "train", *args], env=env, capture_output=True, text=True,
                           timeout=300, cwd=REPO)
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        assert "plain gloo" not in r.stderr and not ext.exists(), name
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "score" / "DONE.json").is_file()


def test_the_demo_starts_the_op_build_in_the_background_only_where_none_is_built(monkeypatch, tmp_path):
    """`tdg demo` overlaps the op's build with its data; the builder process runs the guarded build (here it
    finds no compiler and exits cleanly, leaving the stages to report it), and is not started once an op is
    built."""
    from train.engine.op_build import build_in_background

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("CC", "/bin/false")
    builder = build_in_background()
    assert builder is not None and builder.wait(timeout=120) == 0
    assert not list(tmp_path.glob("*/*.so")) and not list(tmp_path.glob("*/lock"))
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert build_in_background() is None


def test_jit_ops_build_in_a_dir_of_their_own_environment(monkeypatch):
    from train.engine.op_build import extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    root = extensions_root()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(root)
    assert root == Path(sys.prefix) / "torch_extensions" or str(Path.home() / ".cache") in str(root)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert extensions_root() == Path("/elsewhere")  # the user's choice stands


def test_a_dir_finished_by_another_stage_is_not_taken_as_done(finished, capsys):
    from train.cli import main as tdg

    assert tdg(["nat", "--config", "configs/tiny/nat.yaml", "model.path=/m", "data.path=/d",
                f"nat.neg_adapter={finished}", f"engine.output_dir={finished}"]) == 2
    err = capsys.readouterr().err
    assert f"engine.output_dir: {finished} was finished by stage neg, not nat" in err and "Traceback" not in err


def test_a_finished_dir_is_done_only_for_the_config_that_finished_it(finished, prepared_dir, base_model_dir,
                                                                     zero3_partitioned, tmp_path, capsys):
    """A rerun into a finished output dir skips only when its config is the one DONE.json recorded (where and
    how a run is watched aside); another config is refused, naming the keys, instead of taking old results."""
    from dataclasses import asdict

    from train.cli import main as tdg
    from train.config import EvalConfig, load_config
    from train.launch import launch_stage
    from train.manifest import write_done

    args = _neg_args(prepared_dir, base_model_dir, finished, zero3_partitioned)
    assert tdg(["neg", *args, "engine.save_every=0", "engine.log_every=3", "model.gradient_checkpointing=true"]) == 0
    assert f"{finished} already has DONE.json: nothing to do" in capsys.readouterr().out
    assert tdg(["neg", *args, "optim.lr=1e-3", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"engine.output_dir: {finished} was finished under another config (model.path: '{base_model_dir}' -> " \
           f"'{tmp_path}'; optim.lr: 0.005 -> 0.001), so its results are not this config's" in err

    # an eval of another model into a finished eval dir (the case that served a stale result), from the
    # command line and from the launcher tdg demo and tdg ablation use
    out = tmp_path / "eval"
    out.mkdir()
    overrides = ["eval.model=student-a", "eval.test=questions", f"engine.output_dir={out}"]
    write_done(out, config=asdict(load_config(EvalConfig, "configs/tiny/eval.yaml", overrides)), inputs={},
               metrics={}, stage="eval")
    assert tdg(["eval", "--config", "configs/tiny/eval.yaml", *overrides, "eval.batch_questions=4"]) == 0
    assert tdg(["eval", "--config", "configs/tiny/eval.yaml", *overrides, "eval.model=student-b"]) == 2
    assert "eval.model: 'student-a' -> 'student-b'" in capsys.readouterr().err
    with pytest.raises(TdgError, match=r"eval.temperature: 0.3 -> 0.7"):
        launch_stage("eval", "configs/tiny/eval.yaml", [*overrides, "eval.temperature=0.7"], 1, "demo eval", "")


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, prepared_dir, base_model_dir):
    out = tmp_path / "shared"
    args = _neg_args(prepared_dir, base_model_dir, out, "zero2", "optim.max_steps=150", "engine.save_every=0")
    first = subprocess.Popen(stage_cmd("neg", args), env=stage_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((out / ".lock").is_file() and (out / ".lock").read_text()):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = run_stage("neg", args)
    (out / ".lock").unlink()  # the directory's own lock still keeps a third run out
    third = run_stage("neg", args)
    stdout, _ = first.communicate(timeout=600)
    assert second.returncode != 0 and f"engine.output_dir {out} is in use by PID" in second.stderr, second.stderr
    assert third.returncode != 0 and "in use by another run (its .lock file was deleted)" in third.stderr, third.stderr
    assert first.returncode == 0, stdout[-3000:]
    assert len(list((out / "tb").glob("events.*"))) == 1  # one run wrote it


# --- one clear line per failure -------------------------------------------------------------------------


def _two_ranks(stage: str, args: list[str], timeout: int = 300) -> tuple[list[int], str]:
    """Run a stage as srun does (two processes, rendezvous from the environment, no torchrun wrapping their
    output): the exit codes and everything both printed."""
    from train.engine.distributed import free_port

    env = {**stage_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "train", stage, *args], cwd=REPO, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "".join(outputs)


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def _retype_label(prepared: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = next(prepared.glob("data-*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array(range(len(table)), pa.int64())), shard)


MODEL_DAMAGE = {  # found after the ranks start (the data) and before (the weights): two ranks each
    "truncated parquet": ("data", lambda d: _truncate(next(d.glob("data-*.parquet"))), "unreadable prepared shard"),
    "truncated safetensors": ("model", lambda d: _truncate(d / "model.safetensors", 0.7),
                              "damaged or truncated weights"),
}


@pytest.mark.parametrize("case", list(MODEL_DAMAGE))
def test_a_damaged_input_is_one_named_line_from_two_ranks_and_exit_2(case, tmp_path, prepared_dir, base_model_dir):
    which, damage, message = MODEL_DAMAGE[case]
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(prepared_dir, data)
    shutil.copytree(base_model_dir, model)
    damage(data if which == "data" else model)
    codes, output = _two_ranks("neg", _neg_args(data, model, tmp_path / "neg", "zero2"))
    assert 2 in codes and set(codes) <= {1, 2}, (codes, output[-3000:])
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], output[-3000:]
    assert "Traceback" not in output and "Connection closed" not in output, output[-3000:]


def test_a_retyped_parquet_and_a_model_dir_without_weights_are_named(tmp_path, prepared_dir, base_model_dir):
    """The same path as above (a named error, printed once), checked where it is raised."""
    from train.data.dataset import read_prepared
    from train.models.loading import check_model_dir

    data = shutil.copytree(prepared_dir, tmp_path / "data")
    _retype_label(data)
    with pytest.raises(InputError, match="column 'label' is int64, not string; run `tdg prepare` again"):
        read_prepared(data)
    model = shutil.copytree(base_model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    with pytest.raises(TdgError, match="has config.json but no weights"):
        check_model_dir(str(model))


# --- scores ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory, teacher, prepared_dir):
    out = tmp_path_factory.mktemp("scores") / "score"
    _ok(run_stage("score", [f"score.nat_dir={teacher}", f"data.path={prepared_dir}", "data.max_len=384",
                            "data.max_tokens=2048", "score.shard_size=64", "score.top_k=8", "engine.progress=false",
                            f"engine.output_dir={out}"], nproc=1))
    return out


def _distill(scores, prepared, base, out):
    return run_stage("distill", [f"model.path={base}", f"data.path={prepared}", "data.max_len=384",
                                 "data.max_tokens=2048", "optim.max_steps=2", f"distill.scores={scores}",
                                 "engine.progress=false", f"engine.output_dir={out}"], nproc=1)


def test_distill_refuses_damaged_scores_in_one_named_line(scored, tmp_path, prepared_dir, base_model_dir):
    """On two ranks (as srun runs them): the rank that finds the damage names it once, exit 2, no traceback."""
    scores = tmp_path / "score"
    shutil.copytree(scored, scores)
    _overwrite_16_values(scores / "shards" / "shard-00001.safetensors")
    codes, output = _two_ranks("distill", [f"model.path={base_model_dir}", f"data.path={prepared_dir}",
                                           "data.max_len=384", "data.max_tokens=2048", "optim.max_steps=2",
                                           f"distill.scores={scores}", "engine.progress=false",
                                           f"engine.output_dir={tmp_path / 'distill'}"])
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert 2 in codes and len(errors) == 1, (codes, output[-3000:])
    assert "shard-00001.safetensors: does not match its sha256" in errors[0]
    assert "Traceback" not in output and "Connection closed" not in output, output[-3000:]
    assert not (tmp_path / "distill" / "DONE.json").exists()


SCORE_DAMAGE = {
    "truncated": (lambda d: _truncate(d / "shards" / "shard-00001.safetensors", 0.9),
                  "in manifest.json (truncated or replaced)"),
    "garbled manifest": (lambda d: (d / "manifest.json").write_text('{"shards": [{"file": "sh'),
                         "manifest.json: not a score manifest"),
}


@pytest.mark.parametrize("damage", list(SCORE_DAMAGE))
def test_damaged_scores_are_named_before_anything_is_read(damage, scored, tmp_path):
    from train.stages.distill import StoredScores

    scores = shutil.copytree(scored, tmp_path / "score")
    how, message = SCORE_DAMAGE[damage]
    how(scores)
    with pytest.raises(TdgError, match=re.escape(message)):
        StoredScores(scores)


def test_score_restarted_over_a_damaged_shard_scores_it_again(scored, tmp_path, teacher, prepared_dir):
    from safetensors import safe_open

    out = tmp_path / "score"
    shutil.copytree(scored, out)
    for name in ("DONE.json", "manifest.json"):
        (out / name).unlink()
    shard = out / "shards" / "shard-00001.safetensors"
    original = shard.read_bytes()
    _overwrite_16_values(shard)
    result = run_stage("score", [f"score.nat_dir={teacher}", f"data.path={prepared_dir}", "data.max_len=384",
                                 "data.max_tokens=2048", "score.shard_size=64", "score.top_k=8",
                                 "engine.progress=false", f"engine.output_dir={out}"], nproc=1)
    _ok(result)
    assert "1 finished shard(s) cannot be kept, scoring them again" in result.stdout and str(shard) in result.stdout
    with safe_open(str(shard), framework="pt") as f, safe_open(str(scored / "shards" / shard.name), "pt") as g:
        for key in f.keys():  # noqa: SIM118
            torch.testing.assert_close(f.get_tensor(key), g.get_tensor(key))
    assert len(shard.read_bytes()) == len(original)


def test_scores_of_two_recipes_are_never_mixed(scored, tmp_path, teacher, prepared_dir, base_model_dir):
    """An interrupted score rerun with another top_k used to keep the old shards beside new ones of another
    width, and distill trained on the mixture, exit 0. Now the rerun is refused naming the change, --restart
    scores anew, and distill refuses shards of two scorings even where the manifest's digests match them."""
    from safetensors import safe_open

    from train.manifest import file_digest

    out = shutil.copytree(scored, tmp_path / "score")
    for name in ("DONE.json", "manifest.json"):  # as if stopped before the end
        (out / name).unlink()
    args = [f"score.nat_dir={teacher}", f"data.path={prepared_dir}", "data.max_len=384", "data.max_tokens=2048",
            "score.shard_size=64", "score.top_k=4", "engine.progress=false", f"engine.output_dir={out}"]
    refused = run_stage("score", args, nproc=1)
    assert refused.returncode == 2 and "top_k: 8 -> 4" in refused.stderr, refused.stderr[-2000:]
    assert "--restart" in refused.stderr and len(list((out / "shards").glob("shard-*.safetensors"))) > 1
    restarted = run_stage("score", ["--restart", *args], nproc=1)
    _ok(restarted)
    assert "--restart: deleting" in restarted.stdout
    for shard in (out / "shards").glob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert f.metadata()["top_k"] == "4" and f.metadata()["recipe"] == json.loads(
                (out / "manifest.json").read_text())["recipe"]

    mixed = shutil.copytree(scored, tmp_path / "mixed")
    shard = mixed / "shards" / "shard-00001.safetensors"
    shutil.copy(out / "shards" / shard.name, shard)  # another scoring's shard, recorded as if it belonged
    manifest = json.loads((mixed / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["file"].endswith(shard.name))
    entry.update(size=shard.stat().st_size, sha256=file_digest(shard))
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    result = _distill(mixed, prepared_dir, base_model_dir, tmp_path / "distill")
    assert result.returncode == 2 and "shards of another scoring are mixed in: shards/shard-00001" in result.stderr, \
        result.stderr[-2000:]


# --- what stages are pointed at ---------------------------------------------------------------------------


def test_nat_refuses_a_neg_adapter_trained_on_another_base(finished, tmp_path, prepared_dir, base_model_dir):
    """Same shapes, other weights: the adapter used to load and NAT trained garbage, exit 0."""
    other = shutil.copytree(base_model_dir, tmp_path / "other-base")
    _retrained_weights(other)
    result = run_stage("nat", [f"model.path={other}", f"data.path={prepared_dir}", "data.max_len=384",
                               "data.max_tokens=2048", f"nat.neg_adapter={finished}", "engine.progress=false",
                               f"engine.output_dir={tmp_path / 'nat'}"], nproc=1)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"nat.neg_adapter: {finished} was trained on other base weights than model.path {other}" in result.stderr
    assert str(base_model_dir) in result.stderr  # the base it was trained on


def test_export_refuses_to_merge_into_a_base_replaced_since_training(finished, tmp_path, base_model_dir):
    from train.export import export

    src = shutil.copytree(finished, tmp_path / "neg")
    replaced = shutil.copytree(base_model_dir, tmp_path / "base")  # the adapter's base path, other weights now
    _retrained_weights(replaced)
    config = src / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(replaced)}))
    with pytest.raises(TdgError, match=f"trained on other weights than those now at {replaced}"):
        export(src, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_nat_refuses_a_distill_output_as_its_negative_teacher(tmp_path, prepared_dir, base_model_dir, scored):
    student = tmp_path / "distill"
    _ok(_distill(scored, prepared_dir, base_model_dir, student))
    result = run_stage("nat", [f"model.path={base_model_dir}", f"data.path={prepared_dir}", "data.max_len=384",
                               "data.max_tokens=2048", f"nat.neg_adapter={student}", "engine.progress=false",
                               f"engine.output_dir={tmp_path / 'nat'}"], nproc=1)
    assert result.returncode == 2 and f"nat.neg_adapter: {student} is the output of stage distill, not of stage " \
        "neg or sft" in result.stderr, result.stderr[-2000:]

    as_model = run_stage("neg", [f"model.path={student}", f"data.path={prepared_dir}", "engine.progress=false",
                                 f"engine.output_dir={tmp_path / 'neg'}"], nproc=1)
    assert as_model.returncode == 2 and f"model.path: {student} is the output of distill, not a model directory" \
        in as_model.stderr and "tdg export" in as_model.stderr, as_model.stderr[-2000:]


def test_a_missing_model_path_is_named_before_anything_loads(tmp_path, prepared_dir):
    result = run_stage("neg", [f"model.path={tmp_path / 'nowhere'}", f"data.path={prepared_dir}",
                               f"engine.output_dir={tmp_path / 'out'}"], nproc=1)
    assert result.returncode == 2 and f"model.path: {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_of_a_missing_model_creates_nothing(tmp_path, synthetic_raw):
    result = run_stage("eval", ["--model", str(tmp_path / "nowhere"), "--test", str(synthetic_raw / "test")],
                       nproc=1)
    assert result.returncode == 2 and f"eval.model: {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()


# --- bad input --------------------------------------------------------------------------------------------

GOOD = {"question": "Problem:\nWhat is 2+3?", "answer": "2+3=\\boxed{5}", "generated_answer": ["\\boxed{5}"]}


@pytest.mark.parametrize("line,reason,message", [
    ("[" * 100_000 + "]" * 100_000, "invalid_json", "nested too deeply"),
    ('{"question": "q", "answer": "\\\\boxed{1}", "generated_answer": ["a"], "n": ' + "7" * 5000 + "}",
     "invalid_json", "invalid JSON"),
    ('{"question": "What is \\ud800?", "answer": "\\\\boxed{1}", "generated_answer": ["a"]}', "not_unicode",
     "field 'question' holds a lone surrogate"),
    ('{"question": "q?", "answer": "\\\\boxed{1}", "generated_answer": ["ok", "bad \\udc00"]}', "not_unicode",
     "field 'generated_answer[1]' holds a lone surrogate"),
    ('{"question": "q?", "answer": "so \\\\boxed{1", "generated_answer": ["a"]}', "bad_gold",
     "never closes"),
])
def test_bad_lines_are_named_errors_or_counted_skips_and_leave_no_temp_dir(tmp_path, line, reason, message):
    src = tmp_path / "in" / "data.jsonl"
    src.parent.mkdir()
    src.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{re.escape(str(src))}:2: .*{re.escape(message)}"):
        prepare(PrepareOptions(inputs=[str(src)], output=str(out), workers=1, show_progress=False))
    stats = prepare(PrepareOptions(inputs=[str(src)], output=str(out), workers=1, on_error="skip",
                                   show_progress=False))
    assert stats["skipped"] == {reason: 1} and stats["subjects"]["ALL"]["questions"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no .out.tmp left behind


def test_a_byte_order_mark_duplicates_and_a_zero_timeout(tmp_path):
    src = tmp_path / "data.jsonl"
    dup = {**GOOD, "generated_answer": ["\\boxed{5}", "\\boxed{5}", "\\boxed{6}"]}
    src.write_bytes(b"\xef\xbb\xbf" + (json.dumps(dup) + "\n" + json.dumps(dup) + "\n").encode())
    stats = prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "out"), workers=1, show_progress=False))
    assert stats["duplicates"] == {"questions": 1, "rationales": 4}  # line 2 repeats line 1; "\boxed{5}" x 2 + 3
    with pytest.raises(TdgError, match="--timeout must be > 0"):
        prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "o2"), timeout=0, show_progress=False))


# --- full disks -------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as CI has; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_prepare_is_named_and_leaves_nothing(small_disk, synthetic_raw):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 20_000))  # room for a little, not the data
    with pytest.raises(TdgError, match=r"cannot write the prepared data .*MiB free there"):
        prepare(PrepareOptions(inputs=[str(synthetic_raw / "train")], output=str(small_disk / "prepared"),
                               workers=1, show_progress=False))
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_a_full_disk_during_score_is_named(small_disk, teacher, prepared_dir):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 200_000))  # leaves room for the config, not for a shard
    result = run_stage("score", [f"score.nat_dir={teacher}", f"data.path={prepared_dir}", "data.max_len=384",
                                 "data.max_tokens=2048", "score.top_k=8", "engine.progress=false",
                                 f"engine.output_dir={small_disk / 'score'}"], nproc=1)
    assert result.returncode == 2 and "cannot write the shard" in result.stderr and "GiB free there" in result.stderr
    assert "Traceback" not in result.stderr and not list((small_disk / "score" / "shards").glob(".*tmp*"))


def test_a_full_disk_during_a_checkpoint_stops_every_rank_with_the_reason(small_disk, prepared_dir, base_model_dir):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 50_000))  # room for the config and logs, not a ~90 KB checkpoint
    result = run_stage("neg", _neg_args(prepared_dir, base_model_dir, small_disk / "neg", "zero2"))
    assert result.returncode != 0
    assert "cannot write" in result.stderr and "GiB free there" in result.stderr, result.stderr[-3000:]
    assert not list((small_disk / "neg" / "checkpoints").glob("*/COMPLETE.json"))
