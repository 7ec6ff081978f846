"""The sharded scorer: ZeRO-3 on 2 ranks with uneven shards, exact beta, resume after a kill."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tests.conftest import REPO, run_stage, stage_cmd, stage_env
from train.data.dataset import read_prepared, tokenize
from train.data.tokenizer import load_tokenizer
from train.stages.score import read_shard_ids, shard_path

pytestmark = pytest.mark.slow


def overrides(teacher, prepared, out, *extra):
    return [f"score.nat_dir={teacher}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "score.shard_size=64", "score.top_k=8", f"engine.output_dir={out}", "engine.progress=false", *extra]


def _all_ids(out):
    return [sid for p in sorted((out / "shards").glob("shard-*.safetensors")) for sid in read_shard_ids(p)]


def _expected_ids(prepared, base_model_dir):
    data = tokenize(read_prepared(prepared, labels=("pos",)), load_tokenizer(base_model_dir), 384)
    return data


@pytest.fixture(scope="module")
def zero3_scores(tmp_path_factory, teacher, prepared_dir, base_model_dir, zero3_partitioned):
    out = tmp_path_factory.mktemp("score") / "z3"
    five_shards = -(-len(_expected_ids(prepared_dir, base_model_dir)) // 5)  # 5 shards: 3 on rank 0, 2 on rank 1
    result = run_stage("score", overrides(teacher, prepared_dir, out, f"engine.ds_config={zero3_partitioned}",
                                          f"score.shard_size={five_shards}"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_zero3_two_ranks_uneven_shards_score_every_sample_once(zero3_scores, prepared_dir, base_model_dir):
    data = _expected_ids(prepared_dir, base_model_dir)
    n_shards = len(list((zero3_scores / "shards").glob("shard-*.safetensors")))
    assert n_shards == 5  # uneven over 2 ranks: rank 1 had to run padding forward calls
    ids = _all_ids(zero3_scores)
    assert sorted(ids) == sorted(data.ids) and len(set(ids)) == len(ids)
    manifest = json.loads((zero3_scores / "manifest.json").read_text())
    assert manifest["samples"] == len(data) and len(manifest["shards"]) == n_shards
    done = json.loads((zero3_scores / "DONE.json").read_text())["metrics"]
    assert done["world_size"] == 2 and 0 < done["beta_mean"] < 1


def test_beta_and_topk_match_a_direct_computation(zero3_scores, teacher, prepared_dir, base_model_dir):
    from train.models.nat import load_nat_teacher

    data = _expected_ids(prepared_dir, base_model_dir)
    position = {sid: i for i, sid in enumerate(data.ids)}
    nat, neg = load_nat_teacher(teacher, "nat"), load_nat_teacher(teacher, "neg")
    path = shard_path(zero3_scores, 1)
    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["ids"])
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for s in (0, len(ids) // 2, len(ids) - 1):
        i = position[ids[s]]
        x = torch.from_numpy(data.input_ids[i].astype(np.int64))[None]
        plen = int(data.prompt_lens[i])
        with torch.no_grad():
            lp_nat = F.log_softmax(nat(input_ids=x).logits[0, :-1], -1)[plen - 1:]
            lp_neg = F.log_softmax(neg(input_ids=x).logits[0, :-1], -1)[plen - 1:]
        kl = (lp_neg.exp() * (lp_neg - lp_nat)).sum(-1)
        beta = torch.tanh(kl.mean())
        assert beta > 0.01  # the random teacher really disagrees with itself
        assert abs(float(stored["beta"][s]) - float(beta)) < 1e-5
        lo, hi = int(stored["offsets"][s]), int(stored["offsets"][s + 1])
        assert hi - lo == len(lp_nat)
        values, top = lp_nat.topk(8, -1)
        assert torch.equal(stored["topk_ids"][lo:hi].long(), top)
        torch.testing.assert_close(stored["topk_logprobs"][lo:hi].float(), values, atol=2e-3, rtol=1e-3)
        mass = stored["topk_logprobs"][lo:hi].float().exp().sum(-1) + stored["tail_logprob"][lo:hi].exp()
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=5e-3, rtol=0)


def test_scoring_in_chunks_of_target_positions_gives_the_whole_batch_scores(teacher, prepared_dir, base_model_dir):
    """A whole teacher scores chunks of target positions (SCORE_CHUNK): the same beta, top-k and tail as one
    pass over every target at once, and as the direct computation from full logits."""
    from train.data.dataset import collate
    from train.models.nat import load_nat_teacher
    from train.stages.score import score_batch

    data = _expected_ids(prepared_dir, base_model_dir)
    model = load_nat_teacher(teacher, "nat")
    batch = collate(data, np.arange(3), load_tokenizer(base_model_dir).pad_token_id, packing=False)
    whole, chunked = score_batch(model, batch, 8, chunk=0), score_batch(model, batch, 8, chunk=5)
    targets = sum(len(r["tail_logprob"]) for r in whole)
    assert targets > 5 * 3  # several chunks, one crossing each row boundary
    for a, b in zip(whole, chunked, strict=True):
        assert a["beta"] == pytest.approx(b["beta"], abs=1e-6) and torch.equal(a["topk_ids"], b["topk_ids"])
        torch.testing.assert_close(a["topk_logprobs"], b["topk_logprobs"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["tail_logprob"], b["tail_logprob"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = torch.from_numpy(data.input_ids[0].astype(np.int64))[None]
        lp_nat = F.log_softmax(model(input_ids=x).logits[0, :-1], -1)[int(data.prompt_lens[0]) - 1:]
    assert torch.equal(chunked[0]["topk_ids"].long(), lp_nat.topk(8, -1)[1])


def test_killed_after_first_shard_rerun_skips_it_and_scores_every_sample_once(tmp_path, teacher, prepared_dir,
                                                                               base_model_dir):
    out = tmp_path / "killed"
    args = overrides(teacher, prepared_dir, out)
    proc = subprocess.Popen(stage_cmd("score", args, nproc=1), env=stage_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = shard_path(out, 0)
    deadline = time.time() + 300
    while not first.is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE.json").exists()
    stamp = first.stat().st_mtime_ns
    result = run_stage("score", args, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not redone
    data = _expected_ids(prepared_dir, base_model_dir)
    ids = _all_ids(out)
    assert sorted(ids) == sorted(data.ids) and len(set(ids)) == len(ids)
    assert not list((out / "shards").glob(".*tmp*"))  # no half-written shard left behind


def test_inspect_scores_reports_the_extremes_and_writes_a_histogram(zero3_scores, tmp_path):
    from train.score_report import extremes, read_betas

    png, summary_json = tmp_path / "hist.png", tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(REPO / "tools/inspect_scores.py"), str(zero3_scores),
                             "--png", str(png), "--top", "2", "--json", str(summary_json)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    betas = read_betas(zero3_scores)
    summary = json.loads(summary_json.read_text())
    assert summary["samples"] == len(betas.ids) and summary["p0"] <= summary["p50"] <= summary["p100"]
    assert abs(summary["mean"] - float(betas.beta.mean())) < 1e-6
    high, low = extremes(betas, 2)
    assert betas.beta[high[0]] == betas.beta.max() and betas.beta[low[0]] == betas.beta.min()
    for i in high + low:  # each listed with its question text from the prepared data
        assert betas.ids[i] in result.stdout
    assert "question:" in result.stdout


def test_inspect_scores_on_a_wrong_directory_names_it(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools/inspect_scores.py"), str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and str(tmp_path) in result.stderr and "manifest.json" in result.stderr


def _signal_one_worker_when(proc, ready, timeout=300) -> None:
    """SIGTERM one worker of a torchrun launch once `ready()` holds (Slurm often signals only some ranks)."""
    import psutil

    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    # torchrun's own children: a worker's grading subprocesses carry the same command line
    workers = [c for c in psutil.Process(proc.pid).children() if "train" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)


def test_a_stop_signal_ends_score_after_its_round_and_the_rerun_gives_the_same_scores(tmp_path, teacher,
                                                                                        prepared_dir, zero3_scores,
                                                                                        zero3_partitioned):
    out = tmp_path / "stopped"
    args = overrides(teacher, prepared_dir, out, f"engine.ds_config={zero3_partitioned}", "score.shard_size=8")
    proc = subprocess.Popen(stage_cmd("score", args), env=stage_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _signal_one_worker_when(proc, lambda: shard_path(out, 0).is_file())
    stdout, _ = proc.communicate(timeout=300)
    assert "[score] stop requested" in stdout and "exit 75" in stdout, stdout[-3000:]
    assert not (out / "DONE.json").exists()
    written = sorted((out / "shards").glob("shard-*.safetensors"))
    n_shards = -(-len(_all_ids(zero3_scores)) // 8)
    assert 0 < len(written) < n_shards  # stopped part way, with whole shards only
    assert not list((out / "shards").glob(".*tmp*"))
    result = run_stage("score", args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def betas(d):
        found = {}
        for p in sorted((d / "shards").glob("shard-*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                found.update(zip(json.loads(f.metadata()["ids"]), f.get_tensor("beta").tolist(), strict=True))
        return found

    resumed, reference = betas(out), betas(zero3_scores)
    assert resumed.keys() == reference.keys()
    assert max(abs(resumed[k] - reference[k]) for k in reference) < 1e-5
