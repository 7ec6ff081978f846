"""`tdg demo`: the whole pipeline on the embedded default data, on CPU, in minutes.

Steps (each skipped when its output is already complete, so a rerun resumes):
  1. synthetic data (train + held-out test) in the TDG layout   -> OUT/raw
  2. a sentencepiece tokenizer trained on the train text         -> OUT/tokenizer
  3. prepare: grade every rationale, write the prepared data set -> OUT/prepared
  4. a tiny Llama (grouped-query attention) from configs/tiny,
     pre-trained (stage sft, full) on gold solutions of fresh questions -> OUT/pretrain/model
  5. stage neg, then stage nat: 2 processes, DeepSpeed ZeRO-3    -> OUT/neg, OUT/nat
  6. stage score (teacher sharded, ZeRO-3), stage distill (NCE)   -> OUT/score, OUT/distill
  7. export: the student merged into a Hugging Face model dir    -> OUT/export
  8. stage ranker (ASC reward model on the base), stage eval of the exported student on the
     held-out test split: greedy, self-consistency and ASC accuracy -> OUT/ranker, OUT/eval
Training stages run as separate `torchrun` launches, exactly as a user would start them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from train.data.prepare import PrepareOptions, format_stats, prepare
from train.data.synthetic import generate, write_gold_solutions
from train.data.tokenizer import train_tokenizer
from train.export import export
from train.launch import launch_stage
from train.manifest import read_done, write_done
from train.models.loading import build_tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"


@dataclass
class DemoOptions:
    output: str = "demo_out"
    questions: int = 600
    pretrain_questions: int = 47000
    test_questions: int = 1500
    seed: int = 0
    workers: int = 2
    vocab_size: int = 512
    nproc: int = 2  # processes per training stage
    ablation: bool = False  # then run `tdg ablation` on the demo's data
    ablation_seeds: int = 3
    ablation_steps: int = 0  # > 0: optim.max_steps for every ablation training stage
    ablation_questions: int = 0  # > 0: eval.max_questions for the ablation


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def raw_texts(raw: Path):
    """Every text of the train and pretrain splits (never the test split)."""
    for f in sorted([*(raw / "train").rglob("*.jsonl"), *(raw / "pretrain").rglob("*.jsonl")]):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            yield rec["question"]
            yield from (rec["answer"], *rec["generated_answer"]) if "answer" in rec else (rec["rationale"],)


def run_demo(opts: DemoOptions) -> dict:
    out = Path(opts.output)
    raw = out / "raw"
    if read_done(raw) is None:
        _log(f"generating {opts.questions} train + {opts.test_questions} test questions -> {raw}")
        generate(raw, n_train=opts.questions, n_test=opts.test_questions, seed=opts.seed)
        write_gold_solutions(raw / "pretrain" / "gold.jsonl", opts.pretrain_questions, seed=opts.seed)
        write_done(raw, config=vars(opts), inputs={}, metrics={}, stage="demo-data")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        _log(f"training a {opts.vocab_size}-piece sentencepiece tokenizer -> {tok_dir}")
        train_tokenizer(raw_texts(raw), tok_dir, vocab_size=opts.vocab_size)
    prepared = out / "prepared"
    _log(f"prepare -> {prepared}")
    stats = prepare(PrepareOptions(inputs=[str(raw / "train")], output=str(prepared), workers=opts.workers,
                                   tokenizer=str(tok_dir)))
    print(format_stats(stats))
    pre_data = out / "prepared_pretrain"
    prepare(PrepareOptions(inputs=[str(raw / "pretrain")], output=str(pre_data), workers=opts.workers,
                           show_progress=False))
    base_init = out / "base_init"
    if not (base_init / "config.json").is_file():
        _log(f"building a tiny Llama from {CONFIGS / 'model.json'} -> {base_init}")
        build_tiny_model(CONFIGS / "model.json", tok_dir, base_init, seed=opts.seed)
    _run_stage("pretrain", opts, [f"model.path={base_init}", f"data.path={pre_data}",
                                  f"engine.output_dir={out / 'pretrain'}"], stage="sft")
    base = out / "pretrain" / "model"
    paths = [f"model.path={base}", f"data.path={prepared}"]
    _run_stage("neg", opts, [*paths, f"engine.output_dir={out / 'neg'}"])
    _run_stage("nat", opts, [*paths, f"engine.output_dir={out / 'nat'}", f"nat.neg_adapter={out / 'neg'}"])
    _run_stage("score", opts, [f"data.path={prepared}", f"score.nat_dir={out / 'nat'}",
                               f"engine.output_dir={out / 'score'}"])
    _run_stage("distill", opts, [*paths, f"distill.scores={out / 'score'}", f"engine.output_dir={out / 'distill'}"])
    if not (out / "export" / "config.json").is_file():
        _log(export(out / "distill", out / "export"))
    _run_stage("ranker", opts, [*paths, f"engine.output_dir={out / 'ranker'}"])
    _run_stage("eval", opts, [f"eval.model={out / 'export'}", f"eval.test={raw / 'test'}",
                              f"eval.ranker={out / 'ranker'}", f"engine.output_dir={out / 'eval'}"])
    for stage in ("pretrain", "neg", "nat", "distill", "ranker"):
        m = read_done(out / stage)["metrics"]
        _log(f"{stage}: {m['global_step']} steps on {m['world_size']} ranks in {m['seconds']} s, "
             f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}")
    beta = read_done(out / "score")["metrics"]
    _log(f"score: beta mean {beta['beta_mean']:.4f} (min {beta['beta_min']:.4f}, max {beta['beta_max']:.4f})")
    r = read_done(out / "ranker")["metrics"]
    _log(f"ranker: held-out pairwise accuracy {r['heldout_acc']:.3f} on {r['heldout_pairs']} pairs; mean score "
         f"{r['heldout_s_pos']:.2f} on positives, {r['heldout_s_neg']:.2f} on negatives, "
         f"Brier {r['heldout_brier']:.3f}")
    _log(f"student: {out / 'export'} (loads with AutoModelForCausalLM.from_pretrained)")
    _log(f"student on {opts.test_questions} held-out test questions ({out / 'eval' / 'metrics.md'}):")
    print((out / "eval" / "metrics.md").read_text().split("\n", 4)[-1], flush=True)
    if opts.ablation:
        run_demo_ablation(opts, out)
    _log(f"done: {out}  (TensorBoard: tensorboard --logdir {out})")
    return stats


def run_demo_ablation(opts: DemoOptions, out: Path) -> dict:
    from train.ablation import run_ablation
    from train.config import AblationConfig, load_config

    train = [f"optim.max_steps={opts.ablation_steps}"] if opts.ablation_steps else []
    evals = [f"eval.max_questions={opts.ablation_questions}"] if opts.ablation_questions else []
    cfg = load_config(AblationConfig, None, [
        f"ablation.configs={CONFIGS}", f"ablation.seeds={list(range(opts.ablation_seeds))}",
        f"ablation.base_model={out / 'pretrain' / 'model'}", f"ablation.data={out / 'prepared'}",
        f"ablation.test={out / 'raw' / 'test'}", f"ablation.ranker={out / 'ranker'}", f"ablation.nproc={opts.nproc}",
        f"ablation.train_overrides={train}", f"ablation.eval_overrides={evals}",
        f"engine.output_dir={out / 'ablation'}"])
    return run_ablation(cfg)


def _run_stage(name: str, opts: DemoOptions, overrides: list[str], stage: str | None = None) -> None:
    launch_stage(stage or name, CONFIGS / f"{name}.yaml", overrides, opts.nproc, f"demo {name}",
                 "rerun tdg demo to resume")
