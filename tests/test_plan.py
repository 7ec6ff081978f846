"""`tdg plan`: its numbers for the shipped cluster configs against arithmetic written out here, and the
refusals (memory, an unsplittable batch) that stop slurm/pipeline.sh before anything is submitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from train.cli import main as tdg
from train.config import NatConfig, NegConfig, load_config
from train.plan import PRESETS, make_plan

GIB = 2**30
LLAMA = REPO / "configs" / "llama7b"
LARGE = REPO / "configs" / "large-teacher"


def _memory(plan) -> dict[str, float]:
    return {what.split(",")[0].split(":")[0]: b for what, b in plan.memory}


def test_known_parameter_counts():
    assert PRESETS["llama-7b"].params() == 6_738_415_616  # LLaMA-7B as Hugging Face counts it
    assert PRESETS["llama-2-70b"].params() == 68_976_648_192
    assert PRESETS["mistral-7b"].params() == 7_241_732_096


def test_llama7b_neg_on_one_8_gpu_node_matches_hand_arithmetic():
    cfg = load_config(NegConfig, LLAMA / "neg.yaml")
    plan = make_plan("neg", cfg, nodes=1, gpn=8, gpu_mem=80)
    mem = _memory(plan)
    p, t = 6_738_415_616, 32 * 2 * 8 * (4096 + 4096)  # LoRA r 8 on q_proj and v_proj: 4,194,304
    assert mem["frozen weights"] == 2 * p  # 12.55 GiB, whole on every GPU under ZeRO-2
    assert mem["trainable"] == 2 * t + int(18 * t / 8)  # DeepSpeed's ZeRO-2 estimate
    assert mem["activations"] == 4096 * 32 * 2 * (8 * 4096 + 2 * 4096 + 4 * 11008)  # 20.75 GiB
    assert mem["logits"] == 10 * 4096 * 32000
    assert mem["gradient buckets"] == 2 * 50_000_000  # zero2.json: reduce_bucket_size 5e7, no overlap_comm
    assert plan.fits and not plan.problems and round(plan.total / GIB + 2, 2) == 36.63
    assert any("65,536 tokens = 8 rank(s) x 2 micro-batch(es) x 4,096" in note for note in plan.notes)
    assert any(f"~{(2 * 2 * t + 2 * t) / 1e9:,.2f} GB per GPU per optimizer step" in n for n in plan.notes)


def test_large_teacher_nat_on_two_nodes_matches_hand_arithmetic():
    cfg = load_config(NatConfig, LARGE / "nat.yaml")
    plan = make_plan("nat", cfg, nodes=2, gpn=8, gpu_mem=80)
    mem = _memory(plan)
    h, kv, i, layers = 8192, 1024, 28672, 80
    lora = layers * 8 * ((h + h) + (h + kv))  # q_proj (h -> h) and v_proj (h -> kv)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert mem["frozen weights"] == 2 * (68_976_648_192 + lora) / 16  # base + frozen neg branch, partitioned
    assert mem["one gathered layer in flight (2 x 16-bit"] == 4 * layer
    assert mem["activations"] == 2048 * (layers * 2 * h + 2 * (8 * h + 2 * kv + 4 * i))  # checkpointing
    assert plan.fits and not plan.problems
    assert any("32,768 tokens = 16 rank(s) x 1 micro-batch(es) x 2,048" in note for note in plan.notes)
    # ZeRO-3: every weight all-gathered twice per micro-batch (the price of a teacher that does not fit), plus
    # the reduce-scatter of the trainable gradients (pos LoRA and the gate: Q, K, V1 + bias, V2 + bias of width 128)
    gate = layers * (128 * (h + 3 * h) + 128 + h + 128 * (h + 3 * kv) + 128 + kv)
    comm = 2 * 2 * 68_976_648_192 + 2 * (lora + gate)
    assert any(f"~{comm / 1e9:,.2f} GB per GPU per optimizer step" in n for n in plan.notes)


@pytest.mark.parametrize("family,nodes", [("llama7b", 1), ("large-teacher", 2)])
def test_every_shipped_cluster_config_fits_on_80_gb_gpus(family, nodes, capsys):
    files = sorted((REPO / "configs" / family).glob("*.yaml"))
    args = [a for f in files if f.stem not in ("ablation", "run", "sample") for a in ("--config", str(f))]
    assert tdg(["plan", *args, "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert out.count("fits") == len(args) // 2 and "DOES NOT FIT" not in out and "PROBLEM" not in out


def test_a_stage_that_will_not_fit_is_refused_with_the_reason_and_what_to_try(capsys):
    assert tdg(["plan", "--config", str(LLAMA / "neg.yaml"), "--gpus-per-node", "8", "--gpu-mem", "24"]) == 2
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out and "model.gradient_checkpointing=true (activations 20.8 -> 1.6 GiB)" in out
    assert "will not run" in err and "neg.yaml (neg): needs 36.6 GiB of 24 per GPU" in err
    # with the advice taken it fits
    assert tdg(["plan", "--config", str(LLAMA / "neg.yaml"), "--gpus-per-node", "8", "--gpu-mem", "24",
                "model.gradient_checkpointing=true"]) == 0


def test_the_plan_counts_one_chunk_of_logits_with_model_loss_chunk_tokens(capsys):
    """32k-vocabulary logits of 8,192 tokens are 2.4 GiB; in 1,024-position chunks 0.3 GiB, and the plan
    suggests it when a stage does not fit."""
    assert tdg(["plan", "--config", str(LLAMA / "sft.yaml"), "--gpus-per-node", "8", "--gpu-mem", "24",
                "data.max_tokens=8192", "optim.global_batch_tokens=65536"]) == 2
    assert "model.loss_chunk_tokens=1024 (logits 2.4 -> 0.3 GiB)" in capsys.readouterr().out
    cfg = load_config(NegConfig, LLAMA / "neg.yaml", ["data.max_tokens=8192", "optim.global_batch_tokens=65536"])
    whole = _memory(make_plan("neg", cfg, nodes=1, gpn=8, gpu_mem=80))
    cfg.model.loss_chunk_tokens = 1024
    chunked = _memory(make_plan("neg", cfg, nodes=1, gpn=8, gpu_mem=80))
    assert whole["logits"] == 10 * 8192 * 32000 and chunked["logits"] == 10 * 1024 * 32000
    assert {k: v for k, v in whole.items() if k != "logits"} == {k: v for k, v in chunked.items() if k != "logits"}


def test_eager_attention_counts_its_attention_matrices():
    """Eager attention keeps scores and probabilities, [heads x L] bf16 each per token and layer: at max_len
    1024 on LLaMA-7B that is 32 x 1024 x 4 bytes = 128 KiB per token and layer, over 2.5x the fused kernels'."""
    cfg = load_config(NegConfig, LLAMA / "neg.yaml")
    fused = make_plan("neg", cfg, nodes=1, gpn=8, gpu_mem=40)
    cfg.model.attn_implementation = "eager"
    eager_plan = make_plan("neg", cfg, nodes=1, gpn=8, gpu_mem=40)
    assert _memory(eager_plan)["activations"] - _memory(fused)["activations"] == 4096 * 32 * 4 * 32 * 1024  # 16 GiB
    assert fused.fits and not eager_plan.fits and any("model.attn_implementation=auto" in a for a in eager_plan.advice)


def test_a_global_batch_the_ranks_cannot_split_is_refused(capsys):
    assert tdg(["plan", "--config", str(LLAMA / "nat.yaml"), "--nodes", "2", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert "optim.global_batch_tokens=32,768 cannot be met on 16 rank(s) with data.max_tokens=4,096" in err


def test_steps_per_epoch_come_from_the_prepared_token_lengths(tmp_path, synthetic_raw, tokenizer_dir, capsys):
    import json

    from train.data.prepare import PrepareOptions, prepare

    prepared = tmp_path / "prepared"
    prepare(PrepareOptions(inputs=[str(synthetic_raw / "train")], output=str(prepared), workers=1,
                           tokenizer=str(tokenizer_dir), show_progress=False))
    neg = json.loads((prepared / "stats.json").read_text())["subjects"]["ALL"]["lengths"]["neg"]
    assert tdg(["plan", "--config", str(LLAMA / "neg.yaml"), "--gpus-per-node", "8",
                f"data.path={prepared}"]) == 0
    steps = neg["samples"] * neg["mean"] / (0.9 * 65536)
    assert f"~{steps:,.0f} optimizer steps per epoch" in capsys.readouterr().out


def test_pipeline_submits_nothing_when_the_plan_fails(tmp_path):
    """The plan runs before any sbatch: with 1 GiB GPUs even the tiny configs are refused, and no job exists."""
    env = {**os.environ, "TDG_GPU_MEM": "1", "TDG_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), str(LLAMA), "-N", "1", "--ntasks-per-node",
                        "8", "--gpus-per-node", "8"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pipeline: not submitted" in r.stderr and "[plan] neg: 1 node(s) x 8 GPU(s) of 1 GiB" in r.stdout
    assert "job" not in r.stdout  # sbatch (absent from PATH here) was never reached


def test_pipeline_passes_tdg_model_config_to_the_plan(tmp_path):
    """A model path whose name is no known shape stops the plan; TDG_MODEL_CONFIG gives it the shape."""
    env = {**os.environ, "TDG_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    cmd = ["bash", str(REPO / "slurm" / "pipeline.sh"), str(LLAMA), "-N", "1", "--ntasks-per-node", "8",
           "--gpus-per-node", "8", "--", "base_model=/models/my-finetune"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "--model-config" in r.stderr and "TDG_MODEL_CONFIG" in r.stderr, r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TDG_MODEL_CONFIG": "llama-2-7b"},
                       cwd=REPO, timeout=300)
    assert "[plan] neg: 1 node(s) x 8 GPU(s) of 80 GiB" in r.stdout and "preset llama-2-7b" in r.stdout, r.stderr
    assert "pipeline: not submitted (tdg plan" not in r.stderr  # past the plan (sbatch is not on PATH here)
    flag = [*cmd[:2], "--model-config", "llama-2-7b", *cmd[2:]]  # the same, as a flag
    r = subprocess.run(flag, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert "preset llama-2-7b" in r.stdout and "pipeline: not submitted (tdg plan" not in r.stderr, r.stderr


def test_the_slurm_scripts_take_the_active_virtualenvs_python(tmp_path):
    """TDG_PYTHON unset: the activated environment's Python comes before the checkout's .venv."""
    env = {k: v for k, v in os.environ.items() if k != "TDG_PYTHON"}
    r = subprocess.run(["bash", "-c", f". {REPO / 'slurm' / 'python.sh'}; tdg_python {REPO}"], capture_output=True,
                       text=True, env={**env, "VIRTUAL_ENV": sys.prefix}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"{sys.prefix}/bin/python", r.stderr
    r = subprocess.run(["bash", "-c", f". {REPO / 'slurm' / 'python.sh'}; tdg_python {REPO}"], capture_output=True,
                       text=True, env={**env, "VIRTUAL_ENV": str(tmp_path / "no-such-env")}, timeout=120)
    assert r.returncode == 0 and "no-such-env" not in r.stdout  # a stale VIRTUAL_ENV falls through


def _hand_total(family: str, stage: str, world: int) -> float:
    """Bytes per GPU of each shipped cluster config, written out from train/plan.py's stated formulas."""
    h7, i7, h70, kv70, i70, v = 4096, 11008, 8192, 1024, 28672, 32000
    p7, p70 = 6_738_415_616, 68_976_648_192
    act7 = 2 * (8 * h7 + 2 * h7 + 4 * i7)  # per token per layer
    act70 = 2 * (8 * h70 + 2 * kv70 + 4 * i70)
    lora7 = {2: 32 * 8 * (2 * h7 + 2 * h7), 4: 32 * 8 * 4 * (2 * h7)}  # q,v / q,k,v,o
    gate7 = 32 * 2 * (128 * (h7 + 3 * h7) + 128 + h7)
    lora70 = 80 * 8 * ((h70 + h70) + (h70 + kv70))
    gate70 = 80 * (128 * (h70 + 3 * h70) + 128 + h70 + 128 * (h70 + 3 * kv70) + 128 + kv70)
    layer70 = 2 * h70 * h70 + 2 * h70 * kv70 + 3 * h70 * i70 + 2 * h70

    def z2(t):  # + zero2.json's gradient bucket: reduce_bucket_size 5e7 bf16, no overlap_comm
        return 2 * t + int(18 * t / world) + 2 * 50_000_000

    def z3(t):  # + zero3.json's gradient bucket: DeepSpeed's default reduce_bucket_size 5e8 bf16, single
        return int(18 * t / world) + 2 * 500_000_000

    if family == "llama7b":
        lora = {"neg": lora7[2], "sft": lora7[2], "distill": lora7[2], "nat": lora7[2] + gate7,
                "ranker": lora7[4] + h7, "dpo": lora7[2], "redi": lora7[2]}
        tokens = {"neg": 4096, "sft": 4096, "nat": 4096, "distill": 1024, "ranker": 8192, "dpo": 4096, "redi": 4096}
        if stage == "score":
            return 2 * p7 + 8192 * act7 + 10 * 1024 * v  # a whole teacher: chunks of 1,024 target positions
        if stage == "eval":
            weights = 2 * p7 + 2 * (p7 - v * h7 + h7)  # the ranker: a scalar head instead of the LM head
            kv = 2 * 32 * h7 * 2
            return weights + (int((80 * GIB - weights - 2 * GIB) * 0.5) // kv) * kv
        frozen = 2 * (p7 + (lora7[2] if stage == "nat" else 0) - (v * h7 if stage == "ranker" else 0))
        logits = {"ranker": 0, "distill": 14}.get(stage, 10) * tokens[stage] * v
        return frozen + z2(lora[stage]) + tokens[stage] * 32 * act7 + logits
    if stage in ("neg", "nat"):
        tokens = {"neg": 4096, "nat": 2048}[stage]
        frozen = p70 + (lora70 if stage == "nat" else 0)
        trainable = lora70 + (gate70 if stage == "nat" else 0)
        return (2 * frozen / world + 4 * layer70 + z3(trainable) + tokens * (80 * 2 * h70 + act70)
                + 10 * tokens * v)
    if stage == "score":
        return 2 * p70 / world + 4 * layer70 + 8192 * act70 + 10 * 8192 * v
    return _hand_total("llama7b", stage, world)  # distill, ranker, eval: the 7B student


@pytest.mark.parametrize("family,stage", [(f, s) for f in ("llama7b", "large-teacher")
                                          for s in ("sft", "neg", "nat", "score", "distill", "ranker", "eval", "dpo",
                                                    "redi")
                                          if (REPO / "configs" / f / f"{s}.yaml").is_file()])
def test_each_shipped_config_totals_its_hand_arithmetic(family, stage):
    from train.pipeline import config_class

    nodes = 1 if family == "llama7b" else 2
    cfg = load_config(config_class(stage), REPO / "configs" / family / f"{stage}.yaml")
    plan = make_plan(stage, cfg, nodes, 8, 80, config_file=str(REPO / "configs" / family / f"{stage}.yaml"))
    assert plan.total == pytest.approx(_hand_total(family, stage, 8 * nodes), rel=1e-9)


# Published measured peaks, each with its source's exact setting. The plan is for this trainer (DeepSpeed, fp32
# masters, bf16); each row is run as the nearest tdg setting, and the plan + 2 GiB of CUDA context must land within
# +-10% of the figure, read as GB (1e9 bytes). A row that misses stays, as a strict xfail naming why.
# LongLoRA (Chen et al. 2023, arXiv 2309.12307, the efficiency table; its repository's ds_configs/stage2.json).
LONGLORA_STAGE2 = {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 1e9, "reduce_scatter": True,
                   "reduce_bucket_size": 1e9, "overlap_comm": True, "contiguous_gradients": True}
# Qwen (github.com/QwenLM/Qwen, README "Profiling of Memory and Speed", Dec 2023): one A100-SXM4-80G per GPU, bf16,
# FlashAttention-2, batch 1 padded to the sequence length (finetune.py pads to model_max_length), gradient
# checkpointing (the finetune scripts), LoRA r 64 on c_attn, c_proj, w1, w2. c_attn is q/k/v fused (r x (h + 3h)
# LoRA parameters, exactly q_proj + k_proj's with h = kv), c_proj is both o_proj and the MLP's down_proj, w1/w2 are
# gate/up. Multi-GPU cells give the sum over GPUs (139.2G for two 80 GB cards), so the test divides by the count.
# DeepSpeed configs are the repository's finetune/ds_config_zero{2,3}.json with the "auto" values HF's Trainer fills
# (reduce_bucket_size h^2, stage3_prefetch_bucket_size 0.9 h^2, stage3_param_persistence_threshold 10 h).
QWEN_LORA = ["lora.r=64", "lora.target_modules=[q_proj,k_proj,o_proj,gate_proj,up_proj,down_proj]"]
QWEN_ZERO2 = {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
              "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True}


def _qwen_zero3(h: int) -> dict:
    return {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9}


# Shapes from each model's published config.json; Qwen's gives intermediate_size as twice the width of w1 and w2,
# and the width itself is used here.
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "intermediate_size": 11008}
QWEN_1_8B = {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 5504}
QWEN_7B = {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "intermediate_size": 11008}
QWEN_14B = {"vocab_size": 152064, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
            "intermediate_size": 13696}
QWEN_72B = {"vocab_size": 152064, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
            "intermediate_size": 24576}
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
ZERO3_SHORT = ("ZeRO-3 with LoRA on 72B: the plan is 10-12% low at 256-1,024 tokens and within 10% from 2,048 on; the "
               "missing ~5 GB per GPU is constant in the length. Not explained yet (candidates: the parameters "
               "ZeRO-3 keeps gathered, up to stage3_max_live_parameters 1e9, and allocator fragmentation)")
FULL_1_8B = ("a full fine-tune of Qwen-1.8B under ZeRO-3 on one GPU measured 43.5 GB flat from 256 to 2,048 tokens; "
             "the plan (DeepSpeed's 18 bytes per parameter + activations and logits) is 12-15% low up to 1,024. Not "
             "explained yet. Ruled out by reading DeepSpeed's stage3.py: the fp32 gradients of one 1e9 sub_group at "
             "the optimizer step (16 bytes per parameter + 4 GB is 33.4 GB, the 18 bytes per parameter planned 33.1)")


def _published_rows():
    rows = [("longlora-lora-7b-8192", LLAMA2_7B, ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"], 1, 8,
             LONGLORA_STAGE2, 8192, 25.7, None)]
    for table, shape, gpn, nodes, zero, extra, cells, misses in (
            ("qwen-7b-lora", QWEN_7B, 1, 1, None, QWEN_LORA, (20.1, 20.4, 21.5, 23.8, 29.7, 36.6), {}),
            ("qwen-14b-lora", QWEN_14B, 1, 1, None, QWEN_LORA, (34.6, 35.1, 35.3, 37.4, 42.5, 55.2), {}),
            ("qwen-7b-lora-multinode", QWEN_7B, 2, 2, QWEN_ZERO2, QWEN_LORA,
             (74.7, 77.6, 84.9, 95.1, 121.1, 155.5), {}),
            ("qwen-72b-lora-zero3", QWEN_72B, 4, 1, _qwen_zero3(8192), QWEN_LORA,
             (215.4, 217.7, 222.6, 228.8, 249.0, 289.2), {256: ZERO3_SHORT, 512: ZERO3_SHORT, 1024: ZERO3_SHORT}),
            ("qwen-7b-full", QWEN_7B, 2, 1, _qwen_zero3(4096), ["sft.full=true"], (139.2, 148.0, 162.0), {}),
            ("qwen-1.8b-full", QWEN_1_8B, 1, 1, _qwen_zero3(2048), ["sft.full=true"],
             (43.5, 43.5, 43.5, 43.5, 47.1, 48.3), {256: FULL_1_8B, 512: FULL_1_8B, 1024: FULL_1_8B})):
        for length, summed in zip(LENGTHS[:len(cells)], cells, strict=True):  # "-" past 1,024 for 7B full
            rows.append((f"{table}-{length}", shape, extra, nodes, gpn, zero, length,
                         round(summed / (nodes * gpn), 3), misses.get(length)))
    return [pytest.param(*row[1:-1], id=row[0], marks=[pytest.mark.xfail(strict=True, reason=row[-1])] if row[-1]
                         else []) for row in rows]


@pytest.mark.parametrize("shape,extra,nodes,gpn,zero,tokens,published_gb", _published_rows())
def test_the_plan_matches_published_measured_peaks(tmp_path, shape, extra, nodes, gpn, zero, tokens, published_gb):
    """At least six published figures within +-10% (issue 26); the misses are listed, with their reason."""
    from train.config import SftConfig

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(shape))
    ds = "none"
    if zero is not None:
        ds = str(tmp_path / "ds.json")
        Path(ds).write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": zero}))
    cfg = load_config(SftConfig, LLAMA / "sft.yaml", [f"data.max_tokens={tokens}", f"data.max_len={tokens}",
                                                      "model.gradient_checkpointing=true", "model.loss_chunk_tokens=0",
                                                      "optim.global_batch_tokens=0", f"engine.ds_config={ds}", *extra])
    plan = make_plan("sft", cfg, nodes=nodes, gpn=gpn, gpu_mem=80, model=str(tmp_path / "model"))
    planned_gb = (plan.total + 2 * GIB) / 1e9  # with the CUDA context, as a GPU's own counter reports it
    assert planned_gb == pytest.approx(published_gb, rel=0.10)


def test_longloras_gradient_buckets_are_counted(tmp_path):
    """The term that closed LongLoRA's gap: without the gradient buckets (2 x 1e9 bf16 elements, 3.7 GiB) the plan
    was 15% under its measured 25.7 GB."""
    from train.config import SftConfig

    ds = tmp_path / "longlora_stage2.json"
    ds.write_text(json.dumps({"zero_optimization": LONGLORA_STAGE2}))
    cfg = load_config(SftConfig, LLAMA / "sft.yaml", ["data.max_tokens=8192", f"engine.ds_config={ds}"])
    plan = make_plan("sft", cfg, nodes=1, gpn=8, gpu_mem=80, model="llama-2-7b")
    assert _memory(plan)["gradient buckets"] == 2 * 2 * 10**9


def test_gradient_buckets_follow_deepspeeds_defaults_and_refuse_a_bad_config(tmp_path):
    """Unset keys take DeepSpeed's defaults (reduce_bucket_size 5e8; overlap_comm on for ZeRO-3 only, where
    the buffer is single); a bad value names the file."""
    from train.errors import ConfigError
    from train.plan import _gradient_buckets

    for stage, copies in ((2, 1), (3, 1)):
        (tmp_path / f"z{stage}.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        assert _gradient_buckets(str(tmp_path / f"z{stage}.json"))[0] == copies * 2 * 5 * 10**8
    (tmp_path / "off.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "contiguous_gradients": False}}))
    assert _gradient_buckets(str(tmp_path / "off.json"))[0] == 0
    assert _gradient_buckets("none")[0] == 0
    (tmp_path / "bad.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}))
    with pytest.raises(ConfigError, match="bad.json: zero_optimization is not a valid DeepSpeed ZeRO config"):
        _gradient_buckets(str(tmp_path / "bad.json"))


def test_a_hub_id_missing_from_the_cache_is_named_as_such(tmp_path, monkeypatch):
    """On a login node without the model: the plan's error says the id is not in the cache it reads."""
    from train.errors import ConfigError
    from train.plan import shape_of

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=rf"a hub id, not in the Hugging Face cache {tmp_path / 'hub'} here"):
        shape_of("my-org/my-finetune")
    assert shape_of("mistralai/Mistral-7B-Instruct-v0.2")[1] == "preset mistral-7b"  # the name still gives a shape


def test_distill_plans_its_kd_logits_by_chunk():
    """Distill's head and KD run in model.loss_chunk_tokens chunks too: the plan counts one chunk's
    14 bytes per logit (bf16 logits, the student's fp32 log-softmax, loss and gradient)."""
    from train.config import DistillConfig

    cfg = load_config(DistillConfig, LLAMA / "distill.yaml", ["model.loss_chunk_tokens=256"])
    plan = make_plan("distill", cfg, nodes=1, gpn=8, gpu_mem=80, model="llama-2-7b")
    assert _memory(plan)["logits"] == 14 * 256 * 32000


@pytest.mark.parametrize("top_k", [32, 0])
def test_online_distill_plans_the_teacher_logits_by_chunk(top_k):
    """Online distill runs the teacher's head at target positions in score's chunks (nat and neg passes), and for
    whole-vocabulary KD beside each student chunk: no term grows with data.max_tokens past a chunk."""
    from train.config import DistillConfig
    from train.stages.score import SCORE_CHUNK

    cfg = load_config(DistillConfig, LLAMA / "distill.yaml", ["distill.mode=online", "distill.nat_dir=/nowhere",
                                                             f"distill.top_k={top_k}", "data.max_tokens=16384",
                                                             "model.loss_chunk_tokens=512"])
    memory = _memory(make_plan("distill", cfg, nodes=1, gpn=8, gpu_mem=80, model="llama-2-7b"))
    assert memory["online teacher"] == 2 * PRESETS["llama-2-7b"].params() + 10 * SCORE_CHUNK * 32000
    whole_vocab = [b for what, b in memory.items() if what.startswith("online teacher's fp32 log-probs")]
    assert whole_vocab == ([8 * 512 * 32000] if top_k == 0 else [])
