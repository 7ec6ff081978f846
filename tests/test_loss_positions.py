"""The LM head at target positions only, optionally in chunks recomputed in backward (model.loss_chunk_tokens):
the same log-probs and gradients as full logits, fewer head rows, and a clear error for heads it cannot split."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import run_stage
from train.data.dataset import IGNORE
from train.errors import ConfigError
from train.stages.common import token_logprobs


def _model(full: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    if full:
        return model
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE  # prompts
    labels[1, 12:] = IGNORE  # a shorter row's padding
    labels[2, :9] = IGNORE
    return {"input_ids": ids, "labels": labels}


def _full_logits_logprobs(model, batch):
    """What token_logprobs computed before: the head at every position, then the loss at the targets."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                            reduction="none").view(labels.shape)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_head_at_targets_gives_the_log_probs_and_gradients_of_full_logits(full, chunk):
    batch = _batch()
    model = _model(full)
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[:-1]))
    lp, mask = token_logprobs(model, batch, chunk)
    hook.remove()
    (-lp.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = _full_logits_logprobs(model, batch)
    (-ref.sum()).backward()
    targets = int(mask.sum())
    assert targets == int((batch["labels"][:, 1:] != IGNORE).sum()) < batch["labels"][:, 1:].numel()
    torch.testing.assert_close(lp, ref * mask, rtol=1e-5, atol=1e-5)
    assert ours and set(ours) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
    # the model's own forward: the last position only; then the targets, whole or in chunks of `chunk`
    rows = [torch.Size(s).numel() for s in head_rows]
    assert rows[0] == 3  # logits_to_keep=1: one position per row
    assert sum(rows[2:]) == targets and max(rows[2:]) == (chunk or targets)  # rows[1]: the once-per-model check


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("top_k", [4, 0], ids=["sparse", "whole-vocabulary"])
def test_distills_nce_at_targets_in_chunks_matches_full_logits(chunk, top_k):
    """Distill's CE + KD terms from the head at target positions, whole or in chunks, against the loss
    computed from full logits at every position (what distill did before): same value, same gradients."""
    from train.stages.distill import full_kd, nce_loss, sparse_kd, student_terms

    batch, model = _batch(), _model(False)
    mask = batch["labels"][:, 1:] != IGNORE
    n = int(mask.sum())
    g = torch.Generator().manual_seed(2)
    t_lp = torch.log_softmax(torch.randn(n, 300, generator=g), -1)  # a teacher's log-probs at the targets
    weight = 0.5 + torch.rand(n, generator=g)
    if top_k:
        values, ids = t_lp.topk(top_k, -1)
        rows = (ids, values, torch.log1p(-values.exp().sum(-1)))
        kd_fn = lambda lg, *r: sparse_kd(lg, *r, 2.0)  # noqa: E731
    else:
        rows, kd_fn = (t_lp,), lambda lg, t: full_kd(lg, t, 2.0)  # noqa: E731
    ce, kd = student_terms(model, batch, chunk, kd_fn, *rows)
    loss, terms = nce_loss(ce, kd, weight, 0.3)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1][mask].float()
    ref_ce = F.cross_entropy(logits, batch["labels"][:, 1:][mask], reduction="sum")
    ref = 0.7 * ref_ce + 0.3 * (kd_fn(logits, *rows) * weight).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["ce"], ref_ce.detach(), rtol=1e-5, atol=1e-5)
    assert ours
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_whose_logits_are_capped_after_it_is_refused():
    """Gemma 2 soft-caps its logits after the head: log-probs from the head alone would be wrong, silently."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           final_logit_softcapping=0.5))
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM's logits are not its LM head applied to its last hidden"):
        token_logprobs(model, _batch())


@pytest.mark.slow
def test_chunked_and_whole_losses_train_alike_on_two_ranks_and_zero3_refuses_chunks(tmp_path, prepared_dir,
                                                                                    base_model_dir, zero3_partitioned):
    """A full fine-tune (the head trains too) on 2 ranks: chunks under ZeRO-2, the whole target set under ZeRO-2
    and under ZeRO-3 (the head partitioned, called twice per forward) give the same losses. Chunks under
    ZeRO-3 are refused before the model loads: each chunk would gather the head, a different number of times
    on ranks with different numbers of target tokens (a collective mismatch that aborted the job)."""
    from train.manifest import read_done

    def run(chunk: int, ds_config: str, nproc: int = 2):
        out = tmp_path / f"chunk{chunk}-{Path(ds_config).stem}-{nproc}"
        return out, run_stage("sft", [f"model.path={base_model_dir}", f"data.path={prepared_dir}", "data.max_len=384",
                                      "data.max_tokens=2048", "optim.lr=5e-3", "optim.warmup_steps=1",
                                      "optim.max_steps=4", "sft.full=true", f"engine.ds_config={ds_config}",
                                      f"model.loss_chunk_tokens={chunk}", "engine.progress=false",
                                      f"engine.output_dir={out}"], nproc=nproc)

    metrics = {}
    for chunk, ds_config in ((64, "zero2"), (0, "zero2"), (0, str(zero3_partitioned))):
        out, result = run(chunk, ds_config)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
        metrics[chunk, ds_config] = read_done(out)["metrics"]
    first, *others = metrics.values()
    assert first["final_loss"] < first["first_loss"]
    for m in others:
        assert m["tokens"] == first["tokens"]
        for key in ("first_loss", "final_loss"):
            assert m[key] == pytest.approx(first[key], rel=1e-3), key
    _, refused = run(64, str(zero3_partitioned), nproc=1)
    assert refused.returncode == 2 and "model.loss_chunk_tokens: chunks need ZeRO-0, 1 or 2" in refused.stderr
