"""ASC: the ranker learns to put positives above negatives; eval generates, grades, votes, resumes."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage, write_lines
from train.data.dataset import read_prepared, tokenize
from train.data.tokenizer import load_tokenizer
from train.stages.ranker import make_pairs
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
    assert (ranker_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (ranker_dir / "head.safetensors").is_file()
    assert (ranker_dir / "tb").is_dir()


def test_saved_ranker_reloads_with_the_accuracy_it_reported(ranker_dir, labelled_prepared, base_model_dir):
    from train.data.dataset import collate
    from train.models.reward import load_ranker

    ranker, tok = load_ranker(ranker_dir, torch.device("cpu"))
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


def _eval(model, test, ranker, out, nproc=1):
    return run_stage("eval", ["--model", str(model), "--test", str(test), "--ranker", str(ranker), "--num-samples", "3",
                              "--output", str(out), "eval.max_new_tokens=12", "eval.batch_questions=2",
                              "engine.progress=false"], nproc=nproc)


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
    metrics = json.loads((eval_out / "metrics.json").read_text())
    overall = metrics["overall"]
    assert overall["questions"] == 6
    assert overall["sc"] == pytest.approx(100 * sum(r["votes"]["sc"] for r in recs) / 6)
    assert set(metrics["by_subject"]) == {"alpha", "beta"} and set(metrics["by_level"]) == {"Level 1", "Level 2",
                                                                                            "Level 3"}
    assert {"greedy", "sc", "asc_score", "asc_1+score", "asc_1+2score", "pass_at_n"} <= set(overall)
    table = (eval_out / "metrics.md").read_text()
    assert "| **all** | 6 |" in table and "ASC@3 (score)" in table
    assert (eval_out / "DONE.json").is_file() and (eval_out / "tb").is_dir()


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
            "engine.progress=false", f"engine.output_dir={out}"], nproc=1)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        heads.append(load_file(out / "head.safetensors")["weight"])
    assert torch.equal(heads[0], heads[1])
