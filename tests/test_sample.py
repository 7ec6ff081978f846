"""`tdg sample`: questions -> a teacher's rationales (in-process HF, or an OpenAI-compatible server with faults)
-> `tdg prepare` -> `tdg neg`."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_stage, stage_cmd, stage_env
from openai_server import OpenAIServer

from train.data.readers import read_test_questions


def _questions(synthetic_raw: Path, out: Path, k: int) -> list:
    """k MATH-style test questions (problem + solution), from the synthetic test split."""
    qs = read_test_questions(synthetic_raw / "test")[:k]
    out.write_text("".join(json.dumps({"problem": q.question, "solution": f"\\boxed{{{q.gold}}}", "type": q.subject})
                           + "\n" for q in qs))
    return qs


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rationales.jsonl").read_text().splitlines()]


def _one_per_question_and_sample(recs: list[dict], qids: list[str], n: int) -> None:
    keys = Counter((r["qid"], r["id"]) for r in recs)
    assert set(keys.values()) == {1} and len(keys) == len(qids) * n
    assert Counter(r["qid"] for r in recs) == {q: n for q in qids}


@pytest.mark.slow
def test_sample_prepare_neg_end_to_end_and_resume(tmp_path, synthetic_raw, base_model_dir):
    qs = _questions(synthetic_raw, tmp_path / "q.jsonl", 5)
    out = tmp_path / "samples"
    args = ["--model", str(base_model_dir), "--questions", str(tmp_path / "q.jsonl"), "--num-samples", "3",
            "--output", str(out), "sample.max_new_tokens=24", "sample.batch_questions=2", "engine.progress=false"]
    r = run_stage("sample", args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _lines(out)
    _one_per_question_and_sample(recs, [q.qid for q in qs], 3)
    assert [r["question"] for r in recs[::3]] == [q.question for q in qs]  # question order
    assert all(r["gold"] == q.gold for r, q in zip(recs[::3], qs, strict=True))
    done = json.loads((out / "DONE.json").read_text())
    assert done["stage"] == "sample" and done["metrics"]["rationales"] == 15 and done["metrics"]["backend"] == "hf"
    assert not list(out.glob("*.part"))  # the ranks' part files went into rationales.jsonl
    # a run killed mid-write: the torn question is asked again, nothing is duplicated
    (out / "DONE.json").unlink()
    part = out / "part-rank0.jsonl.part"
    (out / "rationales.jsonl").rename(part)  # as a run killed before the merge leaves them (in one part)
    part.write_bytes(part.read_bytes()[:-40])
    r = run_stage("sample", args, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already done" in r.stdout
    _one_per_question_and_sample(_lines(out), [q.qid for q in qs], 3)
    # the loop: prepare grades the sampled rationales (leaving out the ones cut by max_new_tokens), neg trains
    # on the wrong ones
    def prepared(source):
        r = run_stage("prepare", ["--input", str(source), "--output", str(tmp_path / source.stem), "--workers", "1",
                                  "--grader", "hendrycks", "--no-progress"], nproc=1)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / source.stem / "stats.json").read_text())["subjects"]["ALL"]

    cut = sum(not r["finished"] for r in _lines(out))
    if cut < 15:
        stats = prepared(out / "rationales.jsonl")
        assert stats["unfinished"] == cut and stats["rationales"] == 15 - cut
    # a random tiny model rarely ends a rationale within 24 tokens: count them all finished, so that neg has
    # negatives to train on (test_prepare covers the unfinished ones)
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(json.dumps({**r, "finished": True}) + "\n" for r in _lines(out)))
    stats = prepared(whole)
    assert stats["rationales"] == 15 and stats["unfinished"] == 0 and stats["negatives"] > 0
    (tmp_path / "whole").rename(tmp_path / "prepared")
    r = run_stage("neg", ["--config", "configs/tiny/neg.yaml", f"model.path={base_model_dir}",
                          f"data.path={tmp_path / 'prepared'}", f"engine.output_dir={tmp_path / 'neg'}",
                          "optim.max_steps=2", "engine.progress=false", "data.max_tokens=512"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "neg" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_openai_backend_retries_faults_and_reports_what_it_gave_up_on(tmp_path, synthetic_raw, base_model_dir,
                                                                       monkeypatch):
    qs = _questions(synthetic_raw, tmp_path / "q.jsonl", 4)
    out = tmp_path / "samples"
    monkeypatch.setenv("TDG_TEST_KEY", "sk-test-secret-0123")
    args = ["--backend", "openai", "--model", "tiny", "--questions", str(tmp_path / "q.jsonl"), "--num-samples", "2",
            "--output", str(out), "sample.max_new_tokens=12", "sample.server.api_key_env=TDG_TEST_KEY",
            "sample.server.timeout=1.5", "sample.server.backoff=0.05", "sample.server.max_retries=5",
            "sample.server.concurrency=2",
            "engine.progress=false"]
    with OpenAIServer(base_model_dir, stall_seconds=4.0) as server:
        args += ["--base-url", server.url]
        # one question the server always fails: given up on after the retries, named; the others are written,
        # and the status says the output is partial (3); with --require-all it is an error (2)
        server.always_fail = {qs[1].question}
        r = run_stage("sample", [*args, "--require-all"], nproc=1)
        assert r.returncode == 2 and "gave up on 1 of 4 questions after 5 retries" in r.stderr
        assert not (out / "rationales.jsonl").exists()
        r = run_stage("sample", args, nproc=1)
        assert r.returncode == 3 and "gave up on 1 of 4 questions after 5 retries" in r.stderr, r.stderr[-2000:]
        failures = json.loads((out / "failures.json").read_text())
        assert list(failures) == [qs[1].qid] and "InternalServerError" in failures[qs[1].qid]
        _one_per_question_and_sample(_lines(out), [q.qid for q in qs if q is not qs[1]], 2)
        assert not (out / "DONE.json").exists()
        # the rerun asks for that question only, through every kind of fault
        server.always_fail = set()
        server.faults = ["429", "500", "stall", "malformed"]
        before = len(server.requests)
        r = run_stage("sample", args, nproc=1)
        assert r.returncode == 0, r.stderr[-3000:]
        assert {b["prompt"] for b in server.requests[before:]} == {f"Problem:\n{qs[1].question}\nSolution:\n"}
        assert not server.faults  # every fault was served
    _one_per_question_and_sample(_lines(out), [q.qid for q in qs], 2)
    assert json.loads((out / "DONE.json").read_text())["metrics"]["retries"] >= 4
    assert server.auth == {"Bearer sk-test-secret-0123"}  # the key from the environment reached the server
    for f in [out / "config.yaml", out / "DONE.json"]:  # and is written nowhere
        assert "sk-test-secret" not in f.read_text()
    assert "sk-test-secret" not in r.stdout + r.stderr
    assert stage_env()["TDG_TEST_KEY"] == "sk-test-secret-0123"


@pytest.mark.slow
def test_a_server_capping_n_is_asked_again_and_a_bad_request_is_not_retried(tmp_path, synthetic_raw,
                                                                             base_model_dir):
    qs = _questions(synthetic_raw, tmp_path / "q.jsonl", 3)
    out = tmp_path / "samples"
    args = ["--backend", "openai", "--model", "tiny", "--questions", str(tmp_path / "q.jsonl"), "--num-samples", "3",
            "--output", str(out), "sample.max_new_tokens=8", "sample.server.backoff=0.05",
            "sample.server.max_retries=5", "sample.server.concurrency=1", "engine.progress=false"]
    with OpenAIServer(base_model_dir) as server:
        args += ["--base-url", server.url]
        server.max_n, server.faults = 1, ["400"]  # one completion per request at most; the first request is bad
        r = run_stage("sample", args, nproc=1)
        assert r.returncode == 3, r.stderr[-3000:]
        failures = json.loads((out / "failures.json").read_text())
        assert len(failures) == 1 and "HTTP 400" in next(iter(failures.values()))
        asked = [b["prompt"] for b in server.requests]
        failed_prompt = asked[0]  # a 400 is the request's fault: never sent again in this run
        assert asked.count(failed_prompt) == 1
        assert sorted(b["n"] for b in server.requests[1:]) == [1, 1, 1, 1, 3, 3]  # n 3, then 2 more of n 1, x2
    _one_per_question_and_sample(_lines(out), [q.qid for q in qs if q.qid not in failures], 3)


@pytest.mark.slow
def test_eval_through_a_server_gives_the_in_process_greedy_rationales(tmp_path, synthetic_raw, base_model_dir):
    _questions(synthetic_raw, tmp_path / "q.jsonl", 4)
    common = ["--test", str(tmp_path / "q.jsonl"), "--num-samples", "2", "eval.max_new_tokens=8",
              "eval.batch_questions=1", "engine.progress=false"]
    r = run_stage("eval", ["--model", str(base_model_dir), "--output", str(tmp_path / "hf"), *common], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    # as on a login node without a C++ compiler: nothing that only generates may build DeepSpeed's ops
    no_compiler = {**stage_env(), "CXX": "/bin/false", "CC": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "x")}
    with OpenAIServer(base_model_dir) as server:
        server.faults = ["500"]
        r = subprocess.run(stage_cmd("eval", ["--model", "tiny", "--output", str(tmp_path / "served"), *common,
                                              f"eval.server.base_url={server.url}", "eval.server.backoff=0.05"], 1),
                           env=no_compiler, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepspeed" not in (r.stdout + r.stderr).lower()
    assert {b["temperature"] for b in server.requests} == {0.0, 0.5}  # the greedy request and the sampled one

    def preds(name):
        return [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    hf, served = preds("hf"), preds("served")
    assert [p["greedy"]["text"] for p in served] == [p["greedy"]["text"] for p in hf]
    assert [p["prompt"] for p in served] == [p["prompt"] for p in hf]
    assert all(len(p["samples"]) == 2 for p in served)
    assert json.loads((tmp_path / "served" / "DONE.json").read_text())["config"]["eval"]["backend"] == "auto"


def test_vllm_backend_names_what_it_needs(tmp_path, base_model_dir):
    import importlib.util

    from train.backends import VLLMBackend
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="serves model directories only"):
        VLLMBackend(str(tmp_path), None)  # e.g. a LoRA stage output: export it first
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"pip install 'tdg-trainer\[vllm\]'"):
            VLLMBackend(str(base_model_dir), None)


def _vllm_here() -> bool:
    from train.backends import vllm_usable

    return vllm_usable()


@pytest.mark.skipif(not _vllm_here(), reason="needs vLLM and a CUDA GPU (neither on this machine)")
def test_vllm_greedy_equals_the_hf_greedy(base_model_dir):
    import torch

    from train.backends import HFBackend, SamplingSettings, VLLMBackend

    questions = ["What is 2+3?", "Sam has 4 beads and finds 5 more. How many beads?"]
    s = SamplingSettings(4, 0.5, 1.0, 12, 0)
    hf = HFBackend(str(base_model_dir), torch.device("cuda"), torch.float32, None).generate(questions, s)
    vl = VLLMBackend(str(base_model_dir), None).generate(questions, s)
    assert vl.greedy == hf.greedy and [len(x) for x in vl.samples] == [4, 4]


def test_vllm_ranks_each_take_their_own_gpus():
    """Data-parallel vLLM: each local rank's engine sees its own tensor_parallel_size GPUs, never GPU 0 for all."""
    from train.backends import vllm_gpus
    from train.errors import ConfigError

    torchrun = {"LOCAL_WORLD_SIZE": "4"}
    assert [vllm_gpus(1, {**torchrun, "LOCAL_RANK": str(r)}, 4) for r in range(4)] == ["0", "1", "2", "3"]
    assert [vllm_gpus(2, {"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": str(r)}, 8) for r in range(4)] == \
        ["0,1", "2,3", "4,5", "6,7"]
    # a restricted node: the visible ids, not 0..n-1
    assert vllm_gpus(2, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "6,7"
    # srun binding GPUs per task: the task's own GPUs are kept
    assert vllm_gpus(1, {"SLURM_NTASKS_PER_NODE": "8", "LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "5"}) == "5"
    with pytest.raises(ConfigError, match=r"4 ranks on this node x vllm.tensor_parallel_size=2 need 8 GPUs, and 4"):
        vllm_gpus(2, {**torchrun, "LOCAL_RANK": "3"}, 4)


def test_vllm_asks_for_the_gpu_share_the_ranker_leaves():
    """vLLM's gpu_memory_utilization is a share of the whole GPU and it refuses to start with less free: with
    eval's 12.5 GiB ranker already on an 80 GiB GPU, 0.9 would ask for 72 GiB of the 67.5 free."""
    from train.backends import vllm_memory_share
    from train.errors import ConfigError

    gib = 2**30
    assert vllm_memory_share(0.9, 80 * gib, 80 * gib) == 0.9  # nothing else on the GPU: as configured
    share = vllm_memory_share(0.9, int(67.5 * gib), 80 * gib)
    assert share * 80 < 67.5 and share == pytest.approx(67.5 / 80 - 0.03)
    assert vllm_memory_share(0.5, int(67.5 * gib), 80 * gib) == 0.5  # never more than configured
    with pytest.raises(ConfigError, match="only 10.0 of 80.0 GiB is free on the GPU once the ranker is loaded"):
        vllm_memory_share(0.9, 10 * gib, 80 * gib)
