"""`tdg ablation`: does negative data help? Every variant trained and evaluated on the same data.

Variants (the paper's comparison, on one student size):
    base          the base model as it is, no training on the rationales (the reference point)
    sft-pos       LoRA on positives only (the usual distillation baseline)
    sft-mix       LoRA on positives and negatives, negatives unmarked
    neg-then-pos  the neg adapter merged into the base, then LoRA on positives (no gate)
    ul            positives with CE + `unlikelihood` x unlikelihood loss on negatives
    nat           the NAT model itself (neg + pos + gate) used as the student
    kd            distillation from the NAT teacher with beta fixed to 0.5 (plain KD)
    nat+nce       distillation with the scored beta (NCE)
Each seed re-runs every training stage with engine.seed = data.seed = seed (neg and nat too, as
the teacher is part of the method), then evaluates each variant with stage eval (greedy, SC, ASC;
the ranker, trained once, is shared). Stage outputs live in OUT/seed<s>/, so a rerun resumes.
Stages run on this node's GPUs when torch sees any (`ablation.nproc` processes), else on CPU.
Results: results.json (per variant and metric: every seed's value, mean, std), results.md (a
mean ± std table) and ablation.png (bar chart with std error bars).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from train.config import AblationConfig
from train.errors import ConfigError
from train.export import export
from train.launch import launch_stage
from train.manifest import read_done

NEEDS = {"neg": {"neg-then-pos", "nat", "kd", "nat+nce"}, "nat": {"nat", "kd", "nat+nce"}, "score": {"kd", "nat+nce"}}


def _log(msg: str) -> None:
    print(f"[ablation] {msg}", flush=True)


def run_ablation(cfg: AblationConfig) -> dict:
    a = cfg.ablation
    out = Path(cfg.engine.output_dir)
    configs = Path(a.configs)
    for name in ("sft", "neg", "nat", "score", "distill", "eval"):
        if not (configs / f"{name}.yaml").is_file():
            raise ConfigError(f"ablation.configs: {configs} has no {name}.yaml")
    t0 = time.time()
    variants = list(a.variants)
    for seed in a.seeds:
        _log(f"seed {seed}: {', '.join(variants)}")
        _run_seed(cfg, seed, variants, out / f"seed{seed}")
    results = aggregate(out, a.seeds, variants)
    minutes = (time.time() - t0) / 60
    table = results_table(results, _eval_n(cfg), bool(a.ranker), len(a.seeds), minutes)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    bar_chart(results, out / "ablation.png", bool(a.ranker))
    print(table, flush=True)
    _log(f"table {out / 'results.md'}, chart {out / 'ablation.png'} ({minutes:.1f} min)")
    return results


def _eval_n(cfg: AblationConfig) -> int:
    from train.config import EvalConfig, load_config

    return load_config(EvalConfig, Path(cfg.ablation.configs) / "eval.yaml",
                       ["eval.model=x", "eval.test=x", "engine.output_dir=x", *cfg.ablation.eval_overrides]).eval.n


def _run_seed(cfg: AblationConfig, seed: int, variants: list[str], d: Path) -> None:
    a = cfg.ablation
    configs = Path(a.configs)
    cpu = not torch.cuda.is_available()
    common = [f"data.path={a.data}", f"engine.seed={seed}", f"data.seed={seed}", *a.train_overrides]
    student = [f"model.path={a.base_model}", *common]

    def stage(stage_name: str, config: str, name: str, extra: list[str]) -> Path:
        target = d / name
        launch_stage(stage_name, configs / f"{config}.yaml", [*extra, f"engine.output_dir={target}"], a.nproc,
                     f"ablation seed {seed} {name}", "rerun to resume", cpu=cpu)
        return target

    wanted = set(variants)
    models: dict[str, Path] = {"base": Path(a.base_model)}
    if wanted & NEEDS["neg"]:
        neg = stage("neg", "neg", "neg", student)
    if wanted & NEEDS["nat"]:
        nat = stage("nat", "nat", "nat", [*student, f"nat.neg_adapter={neg}"])
        models["nat"] = nat
    if wanted & NEEDS["score"]:
        score = stage("score", "score", "score", [f"data.path={a.data}", f"score.nat_dir={nat}"])
    if "sft-pos" in wanted:
        models["sft-pos"] = stage("sft", "sft", "sft-pos", [*student, "sft.labels=[pos]"])
    if "sft-mix" in wanted:
        models["sft-mix"] = stage("sft", "sft", "sft-mix", [*student, "sft.labels=[pos,neg]"])
    if "ul" in wanted:
        models["ul"] = stage("sft", "sft", "ul", [*student, "sft.labels=[pos,neg]",
                                                      f"sft.unlikelihood={a.unlikelihood}"])
    if "neg-then-pos" in wanted:
        merged = d / "neg-merged"
        if not (merged / "config.json").is_file():
            _log(export(neg, merged))
        models["neg-then-pos"] = stage("sft", "sft", "neg-then-pos",
                                       [f"model.path={merged}", f"model.tokenizer={a.base_model}", *common,
                                        "sft.labels=[pos]"])
    if "kd" in wanted:
        models["kd"] = stage("distill", "distill", "kd", [*student, f"distill.scores={score}",
                                                          "distill.fixed_beta=0.5"])
    if "nat+nce" in wanted:
        models["nat+nce"] = stage("distill", "distill", "nat+nce", [*student, f"distill.scores={score}"])
    for v in variants:
        ranker = [f"eval.ranker={a.ranker}"] if a.ranker else ["eval.ranker="]
        launch_stage("eval", configs / "eval.yaml",
                     [f"eval.model={models[v]}", f"eval.test={a.test}", *ranker, f"eval.seed={seed}",
                      *a.eval_overrides, f"engine.output_dir={d / 'eval' / v}"], a.nproc,
                     f"ablation seed {seed} eval {v}", "rerun to resume", cpu=cpu)


def aggregate(out: Path, seeds: list[int], variants: list[str]) -> dict:
    """{variant: {metric: {values, mean, std}}} over seeds (std: population, 0 for one seed)."""
    results: dict[str, dict] = {}
    for v in variants:
        per_seed = [read_done(out / f"seed{s}" / "eval" / v)["metrics"] for s in seeds]
        keys = [k for k in per_seed[0] if k not in ("questions", "seconds", "world_size")]
        results[v] = {k: {"values": [m[k] for m in per_seed], "mean": float(np.mean([m[k] for m in per_seed])),
                          "std": float(np.std([m[k] for m in per_seed]))} for k in keys}
    return results


def _columns(has_ranker: bool) -> list[tuple[str, str]]:
    cols = [("greedy", "greedy"), ("sc", "SC"), ("pass_at_n", "pass@n")]
    return cols[:2] + [("asc_score", "ASC")] + cols[2:] if has_ranker else cols


def results_table(results: dict, n: int, has_ranker: bool, seeds: int, minutes: float) -> str:
    cols = _columns(has_ranker)
    head = "| variant | " + " | ".join(title.replace("n", str(n)) if title == "pass@n" else
                                     (f"{title}@{n}" if title in ("SC", "ASC") else title) for _, title in cols) + " |"
    lines = [f"Accuracy in % on the test questions, mean ± std over {seeds} seed(s); {minutes:.1f} min in all.", "",
             head, "|" + " --- |" * (len(cols) + 1)]
    for v, metrics in results.items():
        cells = [f"{metrics[k]['mean']:.1f} ± {metrics[k]['std']:.1f}" for k, _ in cols]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path, has_ranker: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(has_ranker)[:-1]  # pass@n is a ceiling, not a method's accuracy
    variants = list(results)
    x = np.arange(len(variants))
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(1.3 * len(variants) + 2, 4))
    for i, (key, title) in enumerate(cols):
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, [results[v][key]["mean"] for v in variants], width,
               yerr=[results[v][key]["std"] for v in variants], capsize=3, label=title)
    ax.set_xticks(x, variants)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Negative-data ablation (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: AblationConfig) -> int:
    run_ablation(cfg)
    return 0
