"""`tdg demo`: the whole pipeline on the embedded default data, on CPU, in the paper's regime.

Steps (each skipped when its output is already complete, so a rerun resumes):
  1. synthetic data -> OUT/raw: train (8 teacher rationales per question, a teacher that is often wrong,
     most of all on long chains), test, valid (its own seed) and the base's pre-training text, no question
     in two splits (train.data.synthetic)
  2. a sentencepiece tokenizer trained on the train and pre-training text        -> OUT/tokenizer
  3. prepare: grade every rationale, print the regime table, write the data set  -> OUT/prepared
  4. a tiny Llama (grouped-query attention) from configs/tiny, pre-trained (stage sft, full) on gold
     solutions of separate questions of Levels 1-2 only (--pretrain-levels): short chains  -> OUT/pretrain;
     the base shipped in configs/tiny/base is installed instead when it was pre-trained from the same data,
     tokenizer, initial weights and recipe (train.demo_base), unless --train-base
  5. sft-pos: LoRA on the teacher's positives, the baseline the method must beat  -> OUT/sft-pos
  6. stage neg, then stage nat: 2 processes, DeepSpeed ZeRO-3                      -> OUT/neg, OUT/nat
  7. stage score (teacher sharded, ZeRO-3), stage distill (NCE)                     -> OUT/score, OUT/distill
  8. export: the student merged into a Hugging Face model dir                      -> OUT/export
  9. stage ranker (ASC reward model on the base), then stage eval on the held-out test split: the base and
     sft-pos greedy, the NCE student greedy, SC and ASC -> OUT/eval-test/{base,sft-pos,nat+nce}; the three
     side by side with CIs and paired differences from sft-pos (train.ablation.compare) -> OUT/results.json
Training stages run as separate `torchrun` launches, exactly as a user would start them.
"""

from __future__ import annotations

import json
from pathlib import Path

from train import demo_base
from train.data.prepare import PrepareOptions, format_regime, format_stats, prepare
from train.data.synthetic import generate
from train.data.tokenizer import train_tokenizer
from train.demo_options import DemoOptions
from train.engine.op_build import build_in_background
from train.errors import TdgError
from train.export import export
from train.launch import launch_stage
from train.manifest import read_done, write_done
from train.models.loading import build_tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def raw_texts(raw: Path):
    """Every text of the train and pretrain splits (never the test split)."""
    for f in sorted([*(raw / "train").rglob("*.jsonl"), *(raw / "pretrain").rglob("*.jsonl")]):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            yield rec["question"]
            yield from (rec["answer"], *rec.get("generated_answer", ())) if "answer" in rec else (rec["rationale"],)


def prepare_base(opts: DemoOptions, out: Path) -> dict:
    """Steps 1-4: the data splits, the tokenizer, prepare and the pre-trained base (each skipped when done);
    returns prepare's stats of the teacher rationales."""
    stats = prepare_inputs(opts, out)
    if read_done(out / "pretrain") is None and not opts.train_base:
        install_shipped_base(opts, out)
    shipped_from = ((read_done(out / "pretrain") or {}).get("metrics") or {}).get("shipped_from")
    if shipped_from and opts.train_base:
        raise TdgError(f"{out / 'pretrain'} holds the base installed from {shipped_from}, and --train-base asks to "
                       f"pre-train one here: give it a new --output, or delete {out / 'pretrain'}")
    if not shipped_from:
        _run_stage("pretrain", opts, pretrain_overrides(opts, out), stage="sft")
    return stats


def prepare_inputs(opts: DemoOptions, out: Path) -> dict:
    """Steps 1-3 and the base's initial weights; returns prepare's stats of the teacher rationales."""
    raw = out / "raw"
    if read_done(raw) is None:
        _log(f"generating {opts.questions} train, {opts.test_questions} test, {opts.valid_questions} validation "
             f"and {opts.pretrain_questions} pre-training questions (levels "
             f"{','.join(map(str, opts.pretrain_levels))}) -> {raw}")
        generate(raw, n_train=opts.questions, n_test=opts.test_questions, seed=opts.seed,
                 n_valid=opts.valid_questions, n_pretrain=opts.pretrain_questions,
                 pretrain_levels=tuple(opts.pretrain_levels), pretrain_style=opts.pretrain_style,
                 pretrain_wording=opts.pretrain_wording)
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
    prepare(PrepareOptions(inputs=[str(raw / "pretrain")], output=str(out / "prepared_pretrain"),
                           workers=opts.workers, show_progress=False))
    base_init = out / "base_init"
    if not (base_init / "config.json").is_file():
        _log(f"building a tiny Llama from {CONFIGS / 'model.json'} -> {base_init}")
        build_tiny_model(CONFIGS / "model.json", tok_dir, base_init, seed=opts.seed)
    return stats


def pretrain_overrides(opts: DemoOptions, out: Path) -> list[str]:
    return [f"model.path={out / 'base_init'}", f"data.path={out / 'prepared_pretrain'}",
            f"optim.epochs={opts.pretrain_epochs}", f"engine.output_dir={out / 'pretrain'}"]


def pretrain_config(opts: DemoOptions, out: Path) -> dict:
    """The config the demo's pre-training stage runs under."""
    from dataclasses import asdict

    from train.config import load_config
    from train.pipeline import config_class

    return asdict(load_config(config_class("sft"), CONFIGS / "pretrain.yaml", pretrain_overrides(opts, out)))


def base_identity(opts: DemoOptions, out: Path, config: dict | None = None) -> dict:
    """What decides the base this demo pre-trains (train.demo_base.identity), from its prepared inputs and its
    pre-training config (`config`: pretrain_config's, where the caller has loaded it)."""
    return demo_base.identity(out, config or pretrain_config(opts, out), opts.nproc)


def install_shipped_base(opts: DemoOptions, out: Path) -> bool:
    """Install the shipped base (train.demo_base) when this demo would pre-train exactly that base; else say what
    differs. Returns whether it was installed."""
    base = Path(opts.base)
    shipped = demo_base.read_shipped(base)
    if shipped is None:
        _log(f"no shipped base in {base}: pre-training here")
        return False
    config = pretrain_config(opts, out)
    changes = demo_base.identity_changes(shipped, base_identity(opts, out, config))
    if changes:
        _log(f"the base in {base} was pre-trained from or under something else ({'; '.join(changes)}): "
             "pre-training here")
        return False
    demo_base.install(base, shipped, out / "pretrain", config)
    m = shipped["done"]["metrics"]
    _log(f"pretrain: installed the base shipped in {base} -> {out / 'pretrain' / 'model'}: it was pre-trained from "
         f"this data, tokenizer and initial weights under this recipe ({m['global_step']} steps on "
         f"{m['world_size']} ranks, {m['seconds']:.0f} s on the machine that trained it); --train-base pre-trains "
         "it here instead")
    return True


def train_sft_pos(opts: DemoOptions, out: Path) -> Path:
    """sft-pos: a LoRA on the teacher's positives, the plain distillation baseline the method must beat."""
    _run_stage("sft", opts, [f"model.path={out / 'pretrain' / 'model'}", f"data.path={out / 'prepared'}",
                             "sft.labels=[pos]", f"engine.output_dir={out / 'sft-pos'}"])
    return out / "sft-pos"


def evaluate(opts: DemoOptions, out: Path, name: str, model: Path, split: str, ranker: Path | None = None,
             overrides: tuple[str, ...] = ()) -> Path:
    """Stage eval of `model` on the `split` questions (test or valid) -> OUT/eval-SPLIT/NAME."""
    target = out / f"eval-{split}" / name
    _run_stage("eval", opts, [f"eval.model={model}", f"eval.test={out / 'raw' / split}", f"eval.ranker={ranker or ''}",
                              *overrides, f"engine.output_dir={target}"])
    return target


def run_demo(opts: DemoOptions) -> dict:
    from train.ablation import compare, results_table

    out = Path(opts.output)
    builder = build_in_background()
    stats = prepare_base(opts, out)
    base = out / "pretrain" / "model"
    prepared = out / "prepared"
    sft_pos = train_sft_pos(opts, out)
    paths = [f"model.path={base}", f"data.path={prepared}"]
    _run_stage("neg", opts, [*paths, f"engine.output_dir={out / 'neg'}"])
    _run_stage("nat", opts, [*paths, f"engine.output_dir={out / 'nat'}", f"nat.neg_adapter={out / 'neg'}"])
    _run_stage("score", opts, [f"data.path={prepared}", f"score.nat_dir={out / 'nat'}",
                               f"engine.output_dir={out / 'score'}"])
    _run_stage("distill", opts, [*paths, f"distill.scores={out / 'score'}", f"engine.output_dir={out / 'distill'}"])
    if not (out / "export" / "config.json").is_file():
        _log(export(out / "distill", out / "export"))
    _run_stage("ranker", opts, [*paths, f"engine.output_dir={out / 'ranker'}"])
    # base and sft-pos greedy only (a ninth of the generation): what the headroom check needs
    evals = {name: [evaluate(opts, out, name, model, "test", overrides=("eval.n=0",))]
             for name, model in (("base", base), ("sft-pos", sft_pos))}
    evals["nat+nce"] = [evaluate(opts, out, "nat+nce", out / "export", "test", out / "ranker")]
    results = compare(evals)
    for stage in ("pretrain", "sft-pos", "neg", "nat", "distill", "ranker"):
        m = read_done(out / stage)["metrics"]
        _log(f"{stage}: {m['global_step']} steps on {m['world_size']} ranks in {m['seconds']} s, "
             f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}"
             + (f" (the run that trained the base shipped in {m['shipped_from']})" if "shipped_from" in m else ""))
    beta = read_done(out / "score")["metrics"]
    _log(f"score: beta mean {beta['beta_mean']:.4f} (min {beta['beta_min']:.4f}, max {beta['beta_max']:.4f})")
    r = read_done(out / "ranker")["metrics"]
    _log(f"ranker: held-out pairwise accuracy {r['heldout_acc']:.3f} on {r['heldout_pairs']} pairs; mean score "
         f"{r['heldout_s_pos']:.2f} on positives, {r['heldout_s_neg']:.2f} on negatives, "
         f"Brier {r['heldout_brier']:.3f}")
    _log("the teacher's rationales (prepare's regime table; the GPT-3.5 MATH set: 36.3% positive, 36.3% of "
         "questions without a positive, 14.6% without a negative):")
    print(format_regime(stats), flush=True)
    _log(f"student: {out / 'export'} (loads with AutoModelForCausalLM.from_pretrained)")
    _log(f"the student (nat+nce) beside the base and sft-pos on {opts.test_questions} held-out test questions "
         f"({out / 'eval-test'}; nat+nce by subject and level: {out / 'eval-test' / 'nat+nce' / 'metrics.md'}):")
    print(results_table(results, _eval_n(), True, 1), flush=True)
    _log("one training seed: another machine's run differs like another seed does (its float rounding differs); "
         "docs/demo.md: the range to expect, from the ablation's seeds")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if opts.ablation:
        run_demo_ablation(opts, out)
    _log(f"done: {out}  (TensorBoard: tensorboard --logdir {out})")
    if builder is not None:
        builder.wait()  # long finished: the first stage waited for it
    return stats


def _eval_n() -> int:
    import yaml

    return int(yaml.safe_load((CONFIGS / "eval.yaml").read_text())["eval"]["n"])


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
