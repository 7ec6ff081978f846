"""NCE distillation: stored top-k == online teacher at k = vocab, beta reaches the loss, tokenizer check."""

import pytest
import torch

from train.config import DistillConfig, ScoreConfig, load_config
from train.data.dataset import collate
from train.engine import distributed as dist_
from train.engine.ds_config import build_ds_config
from train.errors import ConfigError
from train.stages import distill, score


def _common(prepared, base, out, *extra):
    return [f"model.path={base}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "engine.progress=false", f"engine.output_dir={out}", *extra]


def _scores(tmp_path_factory, teacher, prepared_dir, name: str, top_k: int):
    """Stage score's output with `top_k` fp32 log-probs per rationale token (run in this process)."""
    out = tmp_path_factory.mktemp("scores") / name
    cfg = load_config(ScoreConfig, None, [f"score.nat_dir={teacher}", f"data.path={prepared_dir}",
                                          "data.max_len=384", "data.max_tokens=2048", f"score.top_k={top_k}",
                                          "score.logprob_dtype=float32", f"engine.output_dir={out}",
                                          "engine.progress=false"])
    dist_.setup()
    assert score.main(cfg) == 0
    return out


@pytest.fixture(scope="module")
def full_vocab_scores(tmp_path_factory, teacher, prepared_dir):
    return _scores(tmp_path_factory, teacher, prepared_dir, "full", 400)


def _task(prepared, base, out, *extra):
    cfg = load_config(DistillConfig, None, _common(prepared, base, out, *extra))
    return distill.build(cfg, build_ds_config("zero2", cfg.optim, 1, bf16=False))


def _losses(offline, online, idx=tuple(range(8))):
    """((loss, terms) of the offline task, (loss, terms) of the online one) on the same samples, no gradients."""
    with torch.no_grad():
        return (offline.loss_fn(offline.model, offline.collate_fn(list(idx))),
                online.loss_fn(online.model, collate(online.data, list(idx), online.pad_id, packing=False)))


def test_stored_full_vocabulary_loss_equals_the_online_teacher_loss(full_vocab_scores, teacher, prepared_dir,
                                                                     base_model_dir, tmp_path):
    offline = _task(prepared_dir, base_model_dir, tmp_path / "a", f"distill.scores={full_vocab_scores}")
    online = _task(prepared_dir, base_model_dir, tmp_path / "b", "distill.mode=online", f"distill.nat_dir={teacher}")
    (loss_off, terms_off), (loss_on, terms_on) = _losses(offline, online)
    assert terms_off["kd"] > 1.0  # the teacher really differs from the student
    torch.testing.assert_close(terms_off["kd"], terms_on["kd"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms_off["kd_weighted"], terms_on["kd_weighted"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-4, atol=1e-4)


def test_online_with_fixed_beta_runs_the_teacher_once_and_matches_stored(full_vocab_scores, teacher, prepared_dir,
                                                                          base_model_dir, tmp_path, monkeypatch):
    modes = []
    set_mode = score.set_mode
    monkeypatch.setattr(score, "set_mode", lambda model, mode: (modes.append(mode), set_mode(model, mode)))
    offline = _task(prepared_dir, base_model_dir, tmp_path / "a", f"distill.scores={full_vocab_scores}",
                    "distill.fixed_beta=0.25")
    online = _task(prepared_dir, base_model_dir, tmp_path / "b", "distill.mode=online", f"distill.nat_dir={teacher}",
                   "distill.fixed_beta=0.25")
    (loss_off, _), (loss_on, _) = _losses(offline, online)
    assert modes == ["nat"]  # beta is fixed, so the neg-mode forward pass (needed only for KL) is skipped
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def top8_scores(tmp_path_factory, teacher, prepared_dir):
    return _scores(tmp_path_factory, teacher, prepared_dir, "top8", 8)


def test_online_top_k_equals_the_stored_top_k(top8_scores, teacher, prepared_dir, base_model_dir, tmp_path):
    """distill.top_k > 0 online: the teacher's top k + tail bin computed per step (in score's chunks) give the
    loss that the same k stored by stage score gives."""
    offline = _task(prepared_dir, base_model_dir, tmp_path / "a", f"distill.scores={top8_scores}")
    online = _task(prepared_dir, base_model_dir, tmp_path / "b", "distill.mode=online", f"distill.nat_dir={teacher}",
                   "distill.top_k=8")
    (loss_off, terms_off), (loss_on, terms_on) = _losses(offline, online)
    assert terms_off["kd"] > 0.1
    torch.testing.assert_close(terms_off["kd_weighted"], terms_on["kd_weighted"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-4, atol=1e-4)


def test_online_whole_vocabulary_kd_runs_the_teacher_head_in_the_students_chunks(teacher, prepared_dir,
                                                                                  base_model_dir, tmp_path,
                                                                                  monkeypatch):
    """top_k 0 online with model.loss_chunk_tokens: the teacher's log-probs exist one student chunk at a time
    (never [targets, vocab] whole), and the loss and gradients are those of the unchunked loss."""
    rows = []
    full_kd = distill.full_kd
    monkeypatch.setattr(distill, "full_kd", lambda s, t, temp: (rows.append(t.shape[0]), full_kd(s, t, temp))[1])
    idx = list(range(8))
    results = {}
    for chunk in (0, 64):
        task = _task(prepared_dir, base_model_dir, tmp_path / str(chunk), "distill.mode=online",
                     f"distill.nat_dir={teacher}", f"model.loss_chunk_tokens={chunk}")
        batch = collate(task.data, idx, task.pad_id, packing=False)
        rows.clear()
        loss, _ = task.loss_fn(task.model, batch)
        targets = int((batch["labels"][:, 1:] != -100).sum())
        forward_rows = list(rows)
        loss.backward()
        results[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in task.model.named_parameters()
                                          if p.grad is not None})
        assert sum(forward_rows) == targets and max(forward_rows) == min(chunk or targets, targets), forward_rows
    torch.testing.assert_close(results[64][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[64][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_beta_weights_reach_the_gradient(full_vocab_scores, prepared_dir, base_model_dir, tmp_path):
    norms = {}
    for beta in (0.0, 1.0):
        task = _task(prepared_dir, base_model_dir, tmp_path / str(beta), f"distill.scores={full_vocab_scores}",
                     "distill.lam=1.0", f"distill.fixed_beta={beta}")
        task.model.zero_grad()
        loss, _ = task.loss_fn(task.model, task.collate_fn([3]))
        loss.backward()
        norms[beta] = torch.sqrt(sum((p.grad**2).sum() for p in task.model.parameters() if p.grad is not None))
    # with lam = 1 the loss is (0.5 + beta) * KD: forcing beta from 0 to 1 moves the student 3x as much
    torch.testing.assert_close(norms[1.0] / norms[0.0], torch.tensor(3.0), rtol=1e-4, atol=0)


def test_stored_beta_becomes_the_per_token_weight(full_vocab_scores, prepared_dir, base_model_dir, tmp_path):
    task = _task(prepared_dir, base_model_dir, tmp_path / "w", f"distill.scores={full_vocab_scores}")
    scores = distill.StoredScores(full_vocab_scores)
    batch = task.collate_fn([0, 1])
    expected = torch.cat([torch.full((int(task.data.lengths[i] - task.data.prompt_lens[i]),),
                                     0.5 + scores.where[task.data.ids[i]][3]) for i in (0, 1)])
    torch.testing.assert_close(batch["kd_weight"], expected)
    assert len(set(expected.tolist())) == 2  # two samples, two different betas


def test_student_with_another_tokenizer_is_refused(tokenizer_dir, tmp_path, synthetic_raw):
    from train.data.synthetic import make_question
    from train.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [make_question(5, "train", i, "mixed")["question"] for i in range(100)]
    other = train_tokenizer(texts, tmp_path / "other", vocab_size=350)
    with pytest.raises(ConfigError, match="vocabulary .350 tokens. differs from the teacher.s"):
        distill.check_same_vocabulary(other, str(tokenizer_dir))
    distill.check_same_vocabulary(load_tokenizer(tokenizer_dir), str(tokenizer_dir))  # same: accepted


@pytest.mark.parametrize("lp_dtype", [torch.float16, torch.bfloat16])
def test_stored_scores_are_memory_mapped_and_only_a_batch_is_read(tmp_path, lp_dtype):
    import json

    import numpy as np
    from safetensors.torch import save_file

    from train.manifest import file_digest, write_done
    from train.stages.distill import StoredScores, stored_targets

    rng = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2]
    ids = torch.randint(0, 32000, (sum(lengths), 4), generator=rng).to(torch.int16)
    lps = torch.randn(sum(lengths), 4, generator=rng).to(lp_dtype)
    tail = torch.randn(sum(lengths), generator=rng)
    (tmp_path / "shards").mkdir()
    save_file({"offsets": torch.tensor([0, 3, 8, 10]), "beta": torch.tensor([0.1, 0.2, 0.3]),
               "kl_mean": torch.zeros(3), "topk_ids": ids, "topk_logprobs": lps, "tail_logprob": tail},
              str(tmp_path / "shards" / "shard-00000.safetensors"), metadata={"ids": json.dumps(["a", "b", "c"])})
    shard = tmp_path / "shards" / "shard-00000.safetensors"
    (tmp_path / "manifest.json").write_text(json.dumps({"max_len": 0, "shards": [
        {"file": "shards/shard-00000.safetensors", "size": shard.stat().st_size, "sha256": file_digest(shard)}]}))
    write_done(tmp_path, config={}, inputs={}, metrics={}, stage="score")
    scores = StoredScores(tmp_path)
    assert all(isinstance(scores.shards[0][0][name], np.memmap) for name in ("topk_ids", "topk_logprobs"))
    assert scores.where["b"] == (0, 3, 8, pytest.approx(0.2))
    got = stored_targets(scores, ["c", "a"])
    assert got["kd_ids"].dtype == torch.int64 and got["kd_lp"].dtype == torch.float32
    assert torch.equal(got["kd_ids"], torch.cat([ids[8:10], ids[0:3]]).long())
    assert torch.equal(got["kd_lp"], torch.cat([lps[8:10], lps[0:3]]).float())  # bf16 restored exactly
    assert torch.equal(got["kd_tail"], torch.cat([tail[8:10], tail[0:3]]))


def test_distill_heldout_loss_reports_ce_and_kd_of_the_heldout_samples(full_vocab_scores, prepared_dir,
                                                                       base_model_dir, tmp_path):
    import numpy as np

    from train.engine.loop import _target_tokens, heldout_loss

    cfg = load_config(DistillConfig, None, _common(prepared_dir, base_model_dir, tmp_path / "h",
                                                   f"distill.scores={full_vocab_scores}", "data.heldout_fraction=0.3"))
    task = distill.build(cfg, build_ds_config("zero2", cfg.optim, 1, bf16=False))
    held = task.data.heldout
    assert 0 < held.sum() < len(held)
    with torch.no_grad():
        metrics = heldout_loss(task, task.model, held, task.data.lengths, _target_tokens(task.data),
                               task.collate_fn, cfg, torch.device("cpu"))
        idx = np.flatnonzero(held)
        loss, terms = task.loss_fn(task.model, task.collate_fn(idx))  # all of them in one batch, by hand
    tokens = int((task.data.lengths - task.data.prompt_lens)[idx].sum())
    assert metrics["distill/heldout_loss"] == pytest.approx(float(loss) / tokens, rel=1e-4)
    assert metrics["distill/heldout_ce"] == pytest.approx(float(terms["ce"]) / tokens, rel=1e-4)
    assert metrics["distill/heldout_kd"] == pytest.approx(float(terms["kd"]) / tokens, rel=1e-4)
