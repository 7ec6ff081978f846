"""ASC: the ranker learns to put positives above negatives; eval generates, grades, votes, resumes."""

import json
import math
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage, write_lines
from train.data.dataset import read_prepared, tokenize
from train.data.pairs import make_pairs
from train.data.tokenizer import load_tokenizer
from train.voting import Candidate, vote

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labelled_prepared(tmp_path_factory):
    """Flat labelled rationales where negatives differ from positives (a hedge and a wrong sum)."""
    from train.data.prepare import PrepareOptions, prepare

    rng = random.Random(0)
    rows = []
    for q in range(48):
        a, b = rng.randint(10, 60), rng.randint(10, 40)
        question = f"Problem: Sam has {a} beads and finds {b} more. How many beads does Sam have?"
        for k in range(3):
            rows.append({"id": f"q{q}-p{k}", "question": question, "gold": str(a + b), "label": "pos",
                         "rationale": f"Solution: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."})
            wrong = a + b + rng.choice([-10, -1, 1, 10])
            rows.append({"id": f"q{q}-n{k}", "question": question, "gold": str(a + b), "label": "neg",
                         "rationale": f"Solution: maybe {a} - {b} = {wrong}, I guess? So \\boxed{{{wrong}}}."})
    root = tmp_path_factory.mktemp("labelled")
    src = write_lines(root / "rationales.jsonl", rows)
    prepare(PrepareOptions(inputs=[str(src)], output=str(root / "prepared"), workers=1, show_progress=False))
    return root / "prepared"


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory, labelled_prepared, base_model_dir, zero3_partitioned):
    out = tmp_path_factory.mktemp("ranker") / "out"
    result = run_stage("ranker", [
        f"model.path={base_model_dir}", f"data.path={labelled_prepared}", "data.max_len=128", "data.max_tokens=640",
        "optim.lr=3e-3", "optim.warmup_steps=2", "optim.epochs=3", "ranker.heldout_fraction=0.25",
        f"engine.ds_config={zero3_partitioned}", "engine.progress=false", f"engine.output_dir={out}",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_ranker_loss_falls_and_heldout_accuracy_beats_chance(ranker_dir):
    m = json.loads((ranker_dir / "DONE.json").read_text())["metrics"]
    assert m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 0.1
    assert m["heldout_pairs"] >= 20 and m["train_pairs"] >= 2 * m["heldout_pairs"]
    assert m["heldout_acc"] >= 0.85  # chance is 0.5
    # the pointwise loss (the default) makes s = sigmoid(r) an absolute score: high on positives, low on negatives
    assert m["heldout_s_pos"] >= 0.7 and m["heldout_s_neg"] <= 0.3 and m["heldout_brier"] <= 0.15
    assert (ranker_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (ranker_dir / "head.safetensors").is_file()
    assert (ranker_dir / "tb").is_dir()


def test_saved_ranker_reloads_with_the_accuracy_it_reported(ranker_dir, labelled_prepared, base_model_dir):
    from train.data.dataset import collate
    from train.models.reward import load_ranker

    loaded = load_ranker(ranker_dir, torch.device("cpu"))
    ranker, tok = loaded.model, loaded.tokenizer
    assert loaded.spec["max_len"] == 128 and loaded.spec["loss"] == "pointwise"
    table = read_prepared(labelled_prepared)
    data = tokenize(table, load_tokenizer(base_model_dir), 128)
    _, heldout, _ = make_pairs(table.column("qid").to_pylist(), table.column("label").to_pylist(), data,
                               {rid: i for i, rid in enumerate(data.ids)}, table.column("id").to_pylist(), 0.25, 0, 0)
    with torch.no_grad():
        r_pos = ranker(**{k: v for k, v in collate(data, heldout.pos, tok.pad_token_id, False).items()
                          if k in ("input_ids", "attention_mask")})
        r_neg = ranker(**{k: v for k, v in collate(data, heldout.neg, tok.pad_token_id, False).items()
                          if k in ("input_ids", "attention_mask")})
    acc = float((r_pos > r_neg).float().mean())
    reported = json.loads((ranker_dir / "DONE.json").read_text())["metrics"]["heldout_acc"]
    assert abs(acc - reported) <= 1.0 / len(heldout) + 1e-6


def test_a_base_missing_weights_is_refused_under_the_score_head(tmp_path, base_model_dir, capfd):
    """The head swap is loaded quietly (its expected lm_head/score report is noise at every eval), so a body
    weight missing from the checkpoint, which transformers would initialise at random, must be an error."""
    from safetensors.torch import save_file

    from train.config import ModelConfig
    from train.errors import ConfigError
    from train.models.loading import load_base_model

    model = load_base_model(ModelConfig(path=str(base_model_dir)), torch.float32, scalar_head=True)
    assert model.score.out_features == 1 and "LOAD REPORT" not in capfd.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(base_model_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    lost = next(k for k in weights if "layers.1.mlp.up_proj" in k)
    save_file({k: v for k, v in weights.items() if k != lost}, damaged / "model.safetensors", {"format": "pt"})
    with pytest.raises(ConfigError, match="up_proj"):
        load_base_model(ModelConfig(path=str(damaged)), torch.float32, scalar_head=True)


def test_questions_with_one_kind_only_are_skipped_and_counted(labelled_prepared, base_model_dir):
    table = read_prepared(labelled_prepared)
    data = tokenize(table, load_tokenizer(base_model_dir), 128)
    qids, labels = table.column("qid").to_pylist(), table.column("label").to_pylist()
    ids = table.column("id").to_pylist()
    first_q = qids[0]
    keep = [i for i in range(len(ids)) if not (qids[i] == first_q and labels[i] == "neg")]
    train, held, stats = make_pairs([qids[i] for i in keep], [labels[i] for i in keep], data,
                                    {rid: i for i, rid in enumerate(data.ids)}, [ids[i] for i in keep], 0.25, 2, 0)
    assert stats["only_pos"] == 1 and stats["only_neg"] == 0
    assert len(train) + len(held) == 2 * (stats["questions"] - 1)  # capped at 2 pairs per question
    qid_of, label_of = dict(zip(ids, qids, strict=True)), dict(zip(ids, labels, strict=True))
    for p, n in zip(train.pos, train.neg, strict=True):  # every pair: same question, pos vs neg
        assert qid_of[data.ids[p]] == qid_of[data.ids[n]]
        assert (label_of[data.ids[p]], label_of[data.ids[n]]) == ("pos", "neg")


@pytest.fixture(scope="module")
def math_test_file(tmp_path_factory):
    rng = random.Random(1)
    rows = []
    for i in range(6):
        a, b = rng.randint(10, 60), rng.randint(10, 40)
        rows.append({"problem": f"Problem: Sam has {a} beads and finds {b} more. How many beads does Sam have?",
                     "solution": f"{a} + {b} = \\boxed{{{a + b}}}", "type": ["alpha", "beta"][i % 2],
                     "level": f"Level {1 + i % 3}"})
    return write_lines(tmp_path_factory.mktemp("test") / "test.jsonl", rows)


def _eval(model, test, ranker, out, nproc=1, *extra):
    return run_stage("eval", ["--model", str(model), "--test", str(test), "--ranker", str(ranker), "--num-samples", "3",
                              "--output", str(out), "eval.max_new_tokens=12", "eval.batch_questions=2",
                              "engine.progress=false", *extra], nproc=nproc)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def eval_out(tmp_path_factory, base_model_dir, math_test_file, ranker_dir):
    out = tmp_path_factory.mktemp("eval") / "out"
    result = _eval(base_model_dir, math_test_file, ranker_dir, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_eval_writes_predictions_metrics_and_table(eval_out):
    recs = _records(eval_out / "predictions.jsonl")
    assert len(recs) == 6 and len({r["qid"] for r in recs}) == 6
    for r in recs:
        assert len(r["samples"]) == 3 and all(isinstance(s["ranker"], float) for s in r["samples"])
        cands = [Candidate(s["answer"], s["correct"], s["ranker"]) for s in r["samples"]]
        assert r["votes"]["sc"] == vote(cands, "count") and r["votes"]["asc_score"] == vote(cands, "score")
        # the exact prompt: the test file's "Problem: " label stripped, the template's added once
        assert r["prompt"] == f"Problem:\n{r['question']}\nSolution:\n" and not r["question"].startswith("Problem")
        assert all(isinstance(s["finished"], bool) for s in r["samples"])
    metrics = json.loads((eval_out / "metrics.json").read_text())
    overall = metrics["overall"]
    assert overall["questions"] == 6
    assert overall["sc"] == pytest.approx(100 * sum(r["votes"]["sc"] for r in recs) / 6)
    assert set(metrics["by_subject"]) == {"alpha", "beta"} and set(metrics["by_level"]) == {"Level 1", "Level 2",
                                                                                            "Level 3"}
    assert {"greedy", "sc", "asc_score", "asc_1+score", "asc_1+2score", "pass_at_n"} <= set(overall)
    cut = [not s["finished"] for r in recs for s in r["samples"]]
    assert overall["unfinished"] == pytest.approx(100 * sum(cut) / len(cut)) and any(cut)  # 12 new tokens: most
    table = (eval_out / "metrics.md").read_text()
    assert "| **all** | 6 |" in table and "ASC@3 (score)" in table
    assert (eval_out / "DONE.json").is_file() and (eval_out / "tb").is_dir()


@pytest.mark.bf16
def test_eval_in_bf16_on_two_ranks_scores_as_the_fp32_ranker_does(tmp_path, base_model_dir, math_test_file,
                                                                    ranker_dir):
    """eval.precision bf16 (generation, KV budget and ranker in bf16, as on GPUs): every question once, and each
    candidate's bf16 ranker score within 0.1 of the fp32 ranker's on the same text (bf16 keeps ~3 digits)."""
    from train.models.reward import load_ranker

    out = tmp_path / "bf16"
    r = _eval(base_model_dir, math_test_file, ranker_dir, out, 2, "engine.precision=bf16")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = _records(out / "predictions.jsonl")
    assert sorted(x["qid"] for x in recs) == sorted({x["qid"] for x in recs}) and len(recs) == 6
    fp32 = load_ranker(ranker_dir, torch.device("cpu"))
    gaps = []
    for x in recs:
        texts, finished = [s["text"] for s in x["samples"]], [s["finished"] for s in x["samples"]]
        ref = fp32.scores(x["question"], texts, finished, torch.device("cpu"))
        gaps += [abs(s["ranker"] - v) for s, v in zip(x["samples"], ref, strict=True)]
    assert all(math.isfinite(g) for g in gaps) and max(gaps) < 0.1, max(gaps)


def test_eval_greedy_only_gives_the_same_greedy_answers_and_no_votes(eval_out, tmp_path, base_model_dir,
                                                                      math_test_file, ranker_dir):
    """eval.n=0 (the demo's base and sft-pos): the greedy rationales of a full eval, no samples, no votes, and the
    unfinished share of the greedy rationales."""
    out = tmp_path / "greedy"
    result = _eval(base_model_dir, math_test_file, ranker_dir, out, 1, "eval.n=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    recs, full = _records(out / "predictions.jsonl"), {r["qid"]: r for r in _records(eval_out / "predictions.jsonl")}
    assert len(recs) == 6 and all(r["samples"] == [] and r["votes"] == {} for r in recs)
    assert [r["greedy"] for r in recs] == [full[r["qid"]]["greedy"] for r in recs]
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert set(overall) == {"questions", "greedy", "unfinished"}
    assert overall["unfinished"] == pytest.approx(100 * np.mean([not r["greedy"]["finished"] for r in recs]))
    assert "| **all** | 6 |" in (out / "metrics.md").read_text() and "greedy rationales hit" in result.stdout


def test_eval_resume_skips_finished_questions(eval_out, tmp_path, base_model_dir, math_test_file, ranker_dir):
    out = tmp_path / "resumed"
    out.mkdir()
    first = (eval_out / "predictions-rank0.jsonl").read_text().splitlines()[:2]
    (out / "predictions-rank0.jsonl").write_text("\n".join(first) + "\n" + '{"qid": "torn', encoding="utf-8")
    result = _eval(base_model_dir, math_test_file, ranker_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 questions (2 already done)" in result.stdout
    recs = _records(out / "predictions.jsonl")
    assert len(recs) == 6 and len({r["qid"] for r in recs}) == 6
    kept = {json.loads(line)["qid"]: json.loads(line) for line in first}
    for r in recs:  # the finished questions were not generated again
        if r["qid"] in kept:
            assert r == kept[r["qid"]]


def test_eval_on_two_ranks_covers_every_question_once(tmp_path, base_model_dir, math_test_file, ranker_dir):
    out = tmp_path / "dp"
    result = _eval(base_model_dir, math_test_file, ranker_dir, out, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [{r["qid"] for r in _records(out / f"predictions-rank{k}.jsonl")} for k in (0, 1)]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert len(_records(out / "predictions.jsonl")) == 6


def test_eval_bad_test_file_fails_with_its_name(tmp_path, base_model_dir, ranker_dir):
    bad = write_lines(tmp_path / "bad.jsonl", [{"problem": "x?", "solution": "\\boxed{1}"}, {"problem": "y?"}])
    result = _eval(base_model_dir, bad, ranker_dir, tmp_path / "out")
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "missing field 'solution'" in result.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_the_ranker_is_the_same_in_every_run(tmp_path, labelled_prepared, base_model_dir):
    # its scalar head is new (random) at load time; an unseeded one made the demo's held-out accuracy vary
    heads = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = run_stage("ranker", [
            f"model.path={base_model_dir}", f"data.path={labelled_prepared}", "data.max_len=128",
            "data.max_tokens=640", "optim.max_steps=2", "engine.ds_config=zero2", "engine.save_every=0",
            "ranker.loss=pairwise", "engine.progress=false", f"engine.output_dir={out}"], nproc=1)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        heads.append(load_file(out / "head.safetensors")["weight"])
        assert json.loads((out / "ranker.json").read_text())["loss"] == "pairwise"
    assert torch.equal(heads[0], heads[1])


def test_pointwise_loss_is_the_references():
    from train.stages.ranker import bradley_terry, pointwise

    r = torch.tensor([2.0, -1.0, 0.5, 0.0], requires_grad=True)  # pos 2, -1; neg 0.5, 0
    loss, terms = pointwise(r)
    s = torch.sigmoid(r.detach())
    assert loss.item() == pytest.approx(float((1 - s[0]) ** 3 + (1 - s[1]) ** 3 + s[2] ** 3 + s[3] ** 3))
    assert terms["acc"].item() == 1.0  # 2 > 0.5, -1 < 0
    loss.backward()
    assert (r.grad[:2] < 0).all() and (r.grad[2:] > 0).all()  # positives pushed up, negatives down
    # shifting every score moves the pointwise loss (s is absolute) but not Bradley-Terry (only differences count)
    shifted = r.detach() + 3.0
    assert bradley_terry(shifted)[0].item() == pytest.approx(bradley_terry(r.detach())[0].item())
    assert pointwise(shifted)[0].item() != pytest.approx(pointwise(r.detach())[0].item())


def test_eval_refuses_a_ranker_trained_with_another_prompt(tmp_path, base_model_dir, math_test_file, ranker_dir):
    result = run_stage("eval", ["--model", str(base_model_dir), "--test", str(math_test_file), "--ranker",
                                str(ranker_dir), "--output", str(tmp_path / "out"),
                                'eval.prompt_template="Q: {question}\\nA: "'], nproc=1)  # YAML: quoted
    assert result.returncode == 2 and "eval.ranker" in result.stderr and "prompt template" in result.stderr


@pytest.fixture(scope="module")
def endings_only_prepared(tmp_path_factory):
    """Positives and negatives drawn from one distribution of random words, except that two negatives in three
    run past max_len: the only thing that tells them apart is that a cut sample loses its EOS."""
    from train.data.prepare import PrepareOptions, prepare

    rng = random.Random(3)
    words = ["apple", "seven", "plus", "shells", "Nora", "packs", "each", "more", "finds", "total", "then"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)) + f" \\boxed{{{rng.randint(1, 99)}}}"

    rows = []
    for q in range(120):
        question = f"Question {q}: " + " ".join(rng.choice(words) for _ in range(5))
        for k in range(3):
            rows.append({"id": f"q{q}-p{k}", "question": question, "gold": "1", "label": "pos",
                         "rationale": text(rng.randint(4, 12))})
            tail = " ".join(rng.choice(words) for _ in range(80)) if k < 2 else ""
            rows.append({"id": f"q{q}-n{k}", "question": question, "gold": "1", "label": "neg",
                         "rationale": tail + " " + text(rng.randint(4, 12)) if tail else text(rng.randint(4, 12))})
    root = tmp_path_factory.mktemp("endings")
    src = write_lines(root / "rationales.jsonl", rows)
    prepare(PrepareOptions(inputs=[str(src)], output=str(root / "prepared"), workers=1, show_progress=False))
    return root / "prepared"


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_the_ranker_cannot_learn_a_cut_ending_shortcut(endings_only_prepared, base_model_dir, tmp_path, overlong):
    """Cut negatives (truncate) teach "no EOS means wrong": held-out accuracy far above chance that no eval
    candidate, which ends where it ends, would show. Dropped (the default), nothing but noise is left to learn."""
    out = tmp_path / overlong
    result = run_stage("ranker", [
        f"model.path={base_model_dir}", f"data.path={endings_only_prepared}", "data.max_len=160",
        f"data.overlong={overlong}", "data.max_tokens=1024", "optim.lr=3e-3", "optim.warmup_steps=2",
        "optim.epochs=3", "ranker.heldout_fraction=0.3", "engine.ds_config=zero2", "engine.progress=false",
        f"engine.output_dir={out}", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"], nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m = json.loads((out / "DONE.json").read_text())["metrics"]
    assert m["data"]["overlong"] == {"neg": 240} and m["heldout_pairs"] >= 60
    if overlong == "truncate":
        assert m["heldout_acc"] >= 0.7, m
    else:
        assert abs(m["heldout_acc"] - 0.5) <= 0.2, m


def test_a_stop_signal_ends_eval_on_every_rank_and_the_rerun_gives_the_same_predictions(
        tmp_path, base_model_dir, ranker_dir):
    import subprocess

    from tests.conftest import REPO, stage_cmd, stage_env
    from tests.test_score import _signal_one_worker_when

    rng = random.Random(2)
    test = write_lines(tmp_path / "test.jsonl", [
        {"problem": f"Sam has {a} beads and finds {b} more. How many beads?", "solution": f"\\boxed{{{a + b}}}"}
        for a, b in ((rng.randint(10, 60), rng.randint(10, 40)) for _ in range(16))])

    def args(out):
        return ["--model", str(base_model_dir), "--test", str(test), "--ranker", str(ranker_dir), "--num-samples",
                "2", "--output", str(out), "eval.max_new_tokens=8", "eval.batch_questions=1", "engine.progress=false"]

    reference = tmp_path / "reference"
    done = run_stage("eval", args(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(stage_cmd("eval", args(out)), env=stage_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = out / "predictions-rank0.jsonl"
    _signal_one_worker_when(proc, lambda: first.is_file() and first.read_text().count("\n") >= 1)
    stdout, _ = proc.communicate(timeout=300)
    assert stdout.count("stop requested") == 2, stdout[-3000:]  # both ranks stopped, the unsignalled one too
    assert not (out / "DONE.json").exists() and 0 < len(read_predictions_of(out)) < 16
    resumed = run_stage("eval", args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(out / "predictions.jsonl") == _records(reference / "predictions.jsonl")


def read_predictions_of(out):
    from train.stages.evaluate import read_predictions

    return read_predictions(out)


def test_generation_split_by_a_tiny_kv_budget_gives_the_greedy_of_one_batch(base_model_dir):
    from transformers import AutoModelForCausalLM

    from train.data.dataset import prompt_ids
    from train.data.prompt import DEFAULT_TEMPLATE
    from train.generation import generate_rationales, rows_per_call

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True).eval()
    tok = load_tokenizer(base_model_dir)
    questions = [f"Sam has {a} beads" + " and finds more" * k + "." for k, a in enumerate((12, 7, 31, 5, 18))]
    width = max(len(p) for p in prompt_ids(tok, questions))
    budget = 2 * (width + 10)
    assert rows_per_call(budget, width, 10) == 2  # greedy in 3 calls, 5 x 3 samples in 8

    def run(budget_tokens):
        return generate_rationales(model, tok, questions, DEFAULT_TEMPLATE, 3, 1.0, 1.0, 10, 0, torch.device("cpu"),
                                   budget_tokens)

    one, chunked = run(1 << 62), run(budget)
    assert chunked.greedy == one.greedy
    assert [len(s) for s in chunked.samples] == [3] * 5 and [len(f) for f in chunked.finished] == [3] * 5


def test_eval_with_a_tiny_kv_budget_gives_the_same_greedy_predictions(eval_out, tmp_path, base_model_dir,
                                                                       math_test_file, ranker_dir):
    out = tmp_path / "budget"
    result = run_stage("eval", ["--model", str(base_model_dir), "--test", str(math_test_file), "--ranker",
                                str(ranker_dir), "--num-samples", "3", "--output", str(out), "eval.max_new_tokens=12",
                                "eval.batch_questions=2", "eval.max_batch_tokens=40", "engine.progress=false"],
                       nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generation budget 40 tokens per call" in result.stdout
    greedy = {r["qid"]: r["greedy"]["text"] for r in _records(out / "predictions.jsonl")}
    assert greedy == {r["qid"]: r["greedy"]["text"] for r in _records(eval_out / "predictions.jsonl")}


def test_eval_takes_its_kv_budget_once_the_ranker_is_loaded_as_tdg_plan_does(monkeypatch, capsys, tmp_path,
                                                                             base_model_dir, math_test_file,
                                                                             ranker_dir):
    """One fake device, the CUDA context plus three times the generator's bf16 weights: eval's runtime budget
    (the device's free memory once the generator and the ranker are loaded) and `tdg plan`'s give the same
    rows per generate call. Taken before the ranker loaded, the runtime budget counted the ranker's memory as
    free: twice the plan's KV cache here, and on a 40 GiB GPU 13 GiB instead of 6.5 with the ranker on top."""
    import train.generation as generation
    import train.models.reward as reward
    from train.config import EvalConfig, load_config
    from train.generation import rows_per_call
    from train.plan import CONTEXT_GIB, GIB, make_plan, shape_of
    from train.stages import evaluate

    shape = shape_of(str(base_model_dir))[0]
    weights = 2 * shape.params()
    device = CONTEXT_GIB * GIB + 3 * weights
    loaded: list[int] = []

    def holding(load):  # the fake device holds every model loaded so far
        def wrapped(*args, **kwargs):
            out = load(*args, **kwargs)
            module = out[0] if isinstance(out, tuple) else out.model
            loaded.append(sum(p.numel() * p.element_size() for p in module.parameters()))
            return out
        return wrapped

    monkeypatch.setattr(generation, "load_generator", holding(generation.load_generator))
    monkeypatch.setattr(reward, "load_ranker", holding(reward.load_ranker))
    monkeypatch.setattr(generation, "free_memory", lambda _: device - CONTEXT_GIB * GIB - sum(loaded))
    overrides = [f"eval.model={base_model_dir}", f"eval.test={math_test_file}", f"eval.ranker={ranker_dir}",
                 "eval.n=2", "eval.max_new_tokens=8", "eval.max_questions=2", "engine.precision=bf16",
                 "engine.progress=false", f"engine.output_dir={tmp_path / 'eval'}"]
    plan = make_plan("eval", load_config(EvalConfig, None, overrides), 1, 1, device / GIB)
    planned = int(re.search(r"([\d,]+) tokens \(eval.max_batch_tokens=0\)", plan.memory[-1][0])[1].replace(",", ""))
    assert evaluate.main(load_config(EvalConfig, None, overrides)) == 0
    ranker, generator = loaded  # the ranker loads first; it has a scalar head, no LM head
    assert generator == weights and ranker == 2 * (shape.params(lm_head=False) + shape.hidden)
    ran = int(re.search(r"generation budget ([\d,]+) tokens", capsys.readouterr().out)[1].replace(",", ""))
    assert ran == pytest.approx(planned, rel=0.01)
    assert rows_per_call(ran, 256, 8) == rows_per_call(planned, 256, 8)


def test_kv_cache_per_token_and_calls_for_the_7b_eval_config():
    """LLaMA-7B: 2 (K, V) x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB per token in bf16; the shipped eval
    asks 16 questions x 16 samples of up to ~700 tokens, 90 GiB in one call, so it must be split."""
    from transformers import LlamaConfig

    from train.config import EvalConfig, load_config
    from train.generation import kv_cache_bytes_per_token, rows_per_call

    llama7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000)
    per_token = kv_cache_bytes_per_token(llama7b, torch.bfloat16)
    assert per_token == 2 * 32 * 32 * 128 * 2 == 2**19
    e = load_config(EvalConfig, "configs/llama7b/eval.yaml").eval
    prompt = 188  # a long MATH prompt
    one_call = e.batch_questions * e.n * (prompt + e.max_new_tokens) * per_token
    assert one_call / 2**30 == pytest.approx(88.0, abs=1)  # over an 80 GB GPU before any weights
    budget = int((80 - 2 * 12.6) * 2**30 * 0.5) // per_token  # half of what the generator and ranker leave
    rows = rows_per_call(budget, prompt, e.max_new_tokens)
    assert rows == 27.4 * 2048 // 700 == 80  # 27.4 GiB at 0.5 MiB a token, 700 a sequence: 4 calls for 256
