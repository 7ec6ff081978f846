"""The bf16 matrix: every training stage, score and both distill modes, on 2 ranks under ZeRO-2 and ZeRO-3,
in bf16 on DeepSpeed's CPU accelerator (engine.precision=bf16), as a cluster runs them on GPUs.

The precision policy (train.engine.precision): bf16 parameters everywhere, fp32 masters in DeepSpeed's
optimizer, fp32 gradient accumulation, adapters/gate/head saved in fp32 from the masters."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_stage

pytestmark = [pytest.mark.slow, pytest.mark.bf16]
STEPS = 8


def _common(prepared, base, out, ds_config) -> list[str]:
    return [f"model.path={base}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "optim.lr=5e-3", "optim.warmup_steps=1", f"optim.max_steps={STEPS}", "optim.epochs=5",
            "engine.precision=bf16", f"engine.ds_config={ds_config}", "engine.progress=false",
            f"engine.output_dir={out}"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def bf16_runs(request, tmp_path_factory, prepared_dir, base_model_dir, zero3_partitioned):
    zero = request.param
    ds = "zero2" if zero == "zero2" else zero3_partitioned
    root = tmp_path_factory.mktemp(f"bf16-{zero}")
    out = {name: root / name for name in ("sft", "neg", "nat", "score", "distill", "distill-online", "ranker",
                                          "dpo", "redi")}

    def train(stage: str, name: str, *extra: str) -> None:
        _ok(run_stage(stage, [*_common(prepared_dir, base_model_dir, out[name], ds), *extra]))

    train("sft", "sft")
    train("neg", "neg")
    train("nat", "nat", f"nat.neg_adapter={out['neg']}", "nat.gate_dim=16")
    _ok(run_stage("score", [f"data.path={prepared_dir}", "data.max_len=384", "data.max_tokens=2048",
                            f"score.nat_dir={out['nat']}", "engine.precision=bf16", "engine.progress=false",
                            f"engine.ds_config={'none' if zero == 'zero2' else zero3_partitioned}",
                            f"engine.output_dir={out['score']}"]))
    train("distill", "distill", f"distill.scores={out['score']}", "data.heldout_fraction=0.2")
    train("distill", "distill-online", "distill.mode=online", f"distill.nat_dir={out['nat']}")
    train("ranker", "ranker", "ranker.heldout_fraction=0.2")
    train("dpo", "dpo")
    train("redi", "redi")
    return zero, out


@pytest.mark.parametrize("name", ["sft", "neg", "nat", "distill", "distill-online", "ranker", "redi"])
def test_every_training_stage_trains_in_bf16_and_its_loss_goes_down(bf16_runs, name):
    zero, out = bf16_runs
    m = json.loads((out[name] / "DONE.json").read_text())["metrics"]
    assert m["precision"] == "bf16" and m["world_size"] == 2 and m["global_step"] == STEPS
    assert math.isfinite(m["first_loss"]) and math.isfinite(m["final_loss"])
    assert m["final_loss"] < m["first_loss"], (zero, name, m["first_loss"], m["final_loss"])


def test_heldout_loss_in_bf16_is_evaluated_on_every_rank_and_logged(bf16_runs):
    """distill's held-out CE and KD under bf16 (ZeRO-2 and ZeRO-3: equal forward calls on both ranks),
    finite, in DONE.json and in TensorBoard at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = bf16_runs
    done = json.loads((out["distill"] / "DONE.json").read_text())["metrics"]
    history = done["eval_history"]
    assert history and all(math.isfinite(e[k]) and e[k] > 0 for e in history for k in ("heldout_ce", "heldout_kd"))
    events = EventAccumulator(str(out["distill"] / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("distill/heldout_ce")] == [e["step"] for e in history]
    assert events.Scalars("distill/heldout_kd")[-1].value == pytest.approx(history[-1]["heldout_kd"], rel=1e-6)


def test_dpo_in_bf16_starts_at_the_reference_and_saves_fp32(bf16_runs):
    """DPO's per-step loss is noisy over a few steps; what bf16 could break is the reference (the base with
    the adapter off) drifting from the policy at step 1, and the saved dtype."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = bf16_runs
    events = EventAccumulator(str(out["dpo"] / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("dpo/loss")]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the first step, in bf16
    _trained_fp32(out["dpo"] / "adapter" / "adapter_model.safetensors")


def _trained_fp32(path) -> dict[str, torch.Tensor]:
    """The tensors of a saved file: fp32, and holding the fp32 masters (not bf16 values widened)."""
    state = load_file(path)
    assert {t.dtype for t in state.values()} == {torch.float32}, path
    assert any(not torch.equal(t, t.bfloat16().float()) for t in state.values()), f"{path}: bf16-rounded values"
    return state


def test_adapters_gate_and_head_are_saved_in_fp32_from_the_masters(bf16_runs):
    _, out = bf16_runs
    for name in ("sft", "neg", "distill", "distill-online"):
        _trained_fp32(out[name] / "adapter" / "adapter_model.safetensors")
    _trained_fp32(out["nat"] / "pos" / "adapter_model.safetensors")
    _trained_fp32(out["nat"] / "gate.safetensors")
    _trained_fp32(out["ranker"] / "adapter" / "adapter_model.safetensors")
    _trained_fp32(out["ranker"] / "head.safetensors")
    _trained_fp32(out["redi"] / "adapter" / "adapter_model.safetensors")


def test_bf16_scores_are_finite_and_cover_every_sample_once(bf16_runs):
    _, out = bf16_runs
    manifest = json.loads((out["score"] / "manifest.json").read_text())
    assert manifest["samples"] == sum(s["samples"] for s in manifest["shards"]) > 0
    done = json.loads((out["score"] / "DONE.json").read_text())["metrics"]
    assert all(math.isfinite(done[k]) for k in ("beta_mean", "beta_min", "beta_max")) and done["beta_min"] >= 0


def test_nat_neg_mode_in_bf16_matches_peft_neg_adapter(bf16_runs, prepared_dir, base_model_dir):
    """Stated tolerance: in bf16, NAT's neg mode differs from PEFT's neg adapter on the same bf16 base by less
    than PEFT's own bf16 run differs from its fp32 run (mean |delta logit|); in fp32 the two are identical."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.data.dataset import collate, read_prepared, tokenize
    from train.data.tokenizer import load_tokenizer
    from train.models.nat import load_nat_teacher

    _, out = bf16_runs
    tok = load_tokenizer(base_model_dir)
    data = tokenize(read_prepared(prepared_dir, labels=("neg",)).slice(0, 16), tok, 384)
    batch = collate(data, list(range(len(data))), tok.pad_token_id, packing=False)
    real = batch["attention_mask"].bool()

    @torch.no_grad()
    def logits(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[real]

    def peft_neg(dtype):
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True, dtype=dtype)
        return PeftModel.from_pretrained(base, out["neg"] / "adapter").eval()

    ours_bf16 = logits(load_nat_teacher(out["nat"], "neg", dtype=torch.bfloat16))
    peft_bf16, peft_fp32 = logits(peft_neg(torch.bfloat16)), logits(peft_neg(torch.float32))
    assert (ours_bf16 - peft_bf16).abs().mean() < (peft_bf16 - peft_fp32).abs().mean()
    torch.testing.assert_close(logits(load_nat_teacher(out["nat"], "neg", dtype=torch.float32)), peft_fp32,
                               rtol=1e-5, atol=1e-5)
