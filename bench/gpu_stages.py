"""Every stage at Llama 1B / 7B shapes on one device, with the configs/llama7b settings: tokens/s, MFU,
peak memory, and the ratios the design promises.

Runs neg (plain LoRA), nat (gate 128), score (no ZeRO, as shipped), distill from the stored top-k and
distill with the teacher online, the ranker, and eval of one batch (16 questions x 16 samples), each
as its own process (`python -m train STAGE`, a world of one) with the ZeRO stage configs/llama7b ships
(ZeRO-2 for the LoRA stages; bf16 and SDPA attention on a GPU, which the stages choose by themselves).
Records: NAT vs LoRA step throughput (goal >= 0.9x), stored vs online distill (>= 2x), the scorer's
loop against bare teacher forward passes over the same batches (>= 0.9x), the ranker's throughput,
the eval batch's time and memory, and each stage's measured peak memory beside what `tdg plan` predicts
for the same config and overrides on this device (allocated GiB, without the CUDA context).

Model: random init with the shapes of TinyLlama-1.1B or LLaMA-7B and a 32,000-wide vocabulary (the
lm head's real cost; the synthetic data's 512-piece tokenizer only uses its first ids). Data: the
embedded synthetic task, prepared here. `--size tiny` runs the same path on CPU in a few minutes (it
is how the script is checked). Usage: python bench/gpu_stages.py --size 1b|7b|tiny [--steps 20] [--work DIR]
A GPU machine without DeepSpeed needs its wheel first (see the device tool's README).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, record  # noqa: E402
from score_forward import bare_forward  # noqa: E402

from train.manifest import read_done  # noqa: E402

LLAMA = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SIZES = {
    "1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32},
}

# Tokens per micro-batch. Without activation checkpointing a Llama layer keeps about 34 * width bytes
# per token for backward (bf16): 16,384 tokens of 7B would need ~75 GiB of activations on top of the
# weights (and the online teacher's), more than an H100 has; 4,096 need ~19 GiB.
MAX_TOKENS = {"tiny": 16384, "1b": 16384, "7b": 4096}


def prepare_inputs(work: Path, size: str, questions: int) -> tuple[Path, Path]:
    """Synthetic prepared data and a random-init model dir of `size`; reused when present."""
    import torch

    from train.data.prepare import PrepareOptions, prepare
    from train.data.synthetic import generate
    from train.data.tokenizer import train_tokenizer
    from train.models.loading import build_tiny_model
    from train.stages.demo import raw_texts

    raw, tok, prepared, model = work / "raw", work / "tokenizer", work / "prepared", work / f"model-{size}"
    if not (raw / "train").is_dir():
        generate(raw, n_train=questions, n_test=16)
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(raw_texts(raw), tok, vocab_size=512)
    if not (prepared / "DONE.json").is_file():
        prepare(PrepareOptions(inputs=[str(raw / "train")], output=str(prepared), workers=2, tokenizer=str(tok),
                               show_progress=False))
    if not (model / "config.json").is_file():
        spec = json.loads((CONFIGS / "model.json").read_text()) if size == "tiny" else SIZES[size]
        gpu = torch.cuda.is_available()
        build_tiny_model(spec, tok, model, dtype=torch.bfloat16 if gpu else torch.float32,
                         device="cuda" if gpu else "cpu", vocab_size=32000)
    return prepared, model


def _summary(name: str, m: dict) -> str:
    parts = [f"{m['tokens_per_s_median']:.0f} tok/s"]
    if "mfu_median" in m:
        parts.append(f"MFU {100 * m['mfu_median']:.1f}%")
    if "peak_memory_gib" in m:
        parts.append(f"{m['peak_memory_gib']:.1f} GiB")
    return f"{name} " + " ".join(parts)


def planned_gib(name: str, overrides: list[str], gpu_mem_gib: float) -> float:
    """What `tdg plan` predicts for this stage's run on one device, in GiB without the CUDA context (the unit of
    torch.cuda.max_memory_allocated, which the stages record as peak_memory_gib)."""
    from train.config import load_config
    from train.pipeline import config_class
    from train.plan import GIB, make_plan

    file = CONFIGS / f"{name}.yaml"
    plan = make_plan(name, load_config(config_class(name), file, overrides), 1, 1, gpu_mem_gib, config_file=str(file),
                     overrides=tuple(overrides))
    return plan.total / GIB


def plan_vs_measured(rows: list[tuple[str, float, float | None]]) -> str:
    """The stages' planned and measured peaks as a table ("-" where nothing was measured: on CPU)."""
    lines = ["| stage | planned GiB | measured GiB | error |", "| --- | --- | --- | --- |"]
    for run, planned, measured in rows:
        cells = f"{measured:.2f} | {100 * (planned / measured - 1):+.1f}%" if measured else "- | -"
        lines.append(f"| {run} | {planned:.2f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", *SIZES], default="1b", help="model shape")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training stage")
    ap.add_argument("--questions", type=int, default=200, help="synthetic training questions (8 rationales each)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per micro-batch (data.max_tokens); default 16384, 4096 for 7b (see MAX_TOKENS)")
    ap.add_argument("--work", default=None, help="keep data, model and stage outputs here (default: a temp dir)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        prepared, model = prepare_inputs(work, args.size, args.questions)
        max_tokens = args.max_tokens or MAX_TOKENS[args.size]
        common = [f"model.path={model}", f"data.path={prepared}", f"data.max_tokens={max_tokens}",
                  f"optim.max_steps={args.steps}", "engine.ds_config=zero2", "engine.save_every=0",
                  "engine.progress=false"]
        gate = [] if args.size == "tiny" else ["nat.gate_dim=128"]
        out = work / f"runs-{args.size}"
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
        memory_rows: list[tuple[str, float, float | None]] = []

        def stage(name: str, extra: list[str], run: str | None = None) -> dict:
            from train.launch import launch_stage

            target = out / (run or name)
            overrides = [*extra, f"engine.output_dir={target}"]
            launch_stage(name, CONFIGS / f"{name}.yaml", overrides, 1, f"bench {run or name}", "rerun to resume",
                         cpu=not torch.cuda.is_available())
            metrics = read_done(target)["metrics"]
            print(f"[bench] {run or name}: {json.dumps(metrics)}", flush=True)
            memory_rows.append((run or name, planned_gib(name, overrides, gpu_mem), metrics.get("peak_memory_gib")))
            return metrics

        neg = stage("neg", common)
        nat = stage("nat", [*common, *gate, f"nat.neg_adapter={out / 'neg'}"])
        score = stage("score", [f"data.path={prepared}", f"score.nat_dir={out / 'nat'}", "engine.ds_config=none"])
        offline = stage("distill", [*common, f"distill.scores={out / 'score'}"])
        online = stage("distill", [*common, "distill.mode=online", f"distill.nat_dir={out / 'nat'}"], "distill-online")
        ranker = stage("ranker", [*common, f"data.max_tokens={2 * max_tokens}"])
        evaluation = stage("eval", [f"eval.model={out / 'distill'}", f"eval.test={work / 'raw' / 'test'}",
                                    f"eval.ranker={out / 'ranker'}", "eval.n=16", "eval.batch_questions=16",
                                    "eval.max_questions=16", "eval.max_new_tokens=512"])
        bare, _ = bare_forward(out / "score", "cuda" if torch.cuda.is_available() else "cpu")
        t_bare = min(bare() for _ in range(2))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    what = f"Llama-{args.size} shapes, 32k vocabulary, random init, {args.steps} steps, 1 device ZeRO-2"
    gpu_goal = "" if torch.cuda.is_available() else " (CPU run: checks the script, not the goal)"
    r_nat = nat["tokens_per_s_median"] / neg["tokens_per_s_median"]
    record(f"NAT vs LoRA throughput, {what}", _summary("LoRA", neg), _summary("NAT", nat), f"{r_nat:.2f}x",
           ">= 0.9x" + gpu_goal, dev=device)
    r_kd = offline["tokens_per_s_median"] / online["tokens_per_s_median"]
    record(f"distill stored top-k vs online teacher, {what}", _summary("online", online),
           _summary("stored", offline), f"{r_kd:.2f}x", ">= 2x" + gpu_goal, dev=device)
    t_loop = score["rank0_scoring_seconds"]
    record(f"scorer vs bare teacher forward passes (nat + neg), {what}",
           f"bare forward loop {score['samples'] / t_bare:.1f} samples/s",
           f"stage score {score['samples'] / t_loop:.1f} samples/s in its scoring loop "
           f"({score['samples']} samples; whole stage {score['seconds']} s incl. loading)",
           f"{t_bare / t_loop:.2f}x", ">= 0.9x" + gpu_goal, dev=device)
    record(f"ranker (pairs), {what}", "-", _summary("ranker", ranker), "-", "-", dev=device)
    memory = f", peak {evaluation['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in evaluation else ""
    table = plan_vs_measured(memory_rows)
    print(f"[bench] peak memory per stage, tdg plan against measured ({device or 'CPU: not measured'}):\n{table}",
          flush=True)
    if device:
        record(f"peak memory, tdg plan vs measured (allocated GiB, no CUDA context), {what}", "-",
               "; ".join(f"{run} plan {p:.1f} / measured {m:.1f}" for run, p, m in memory_rows if m), "-",
               "plan within +-10%", dev=device)
    record(f"eval of one batch: 16 questions x (1 greedy + 16 samples) of up to 512 new tokens "
           f"(configs/llama7b/eval.yaml), ranker scoring, "
           f"{what.split(', random')[0]}", "-", f"{evaluation['seconds']:.0f} s{memory}", "-", "-", dev=device)


if __name__ == "__main__":
    main()
