"""`tdg ablation`: does negative data help? Every variant trained and evaluated on the same data.

Variants (the paper's comparison, on one student size):
    base          the base model as it is, no training on the rationales (the reference point)
    sft-pos       LoRA on positives only (the usual distillation baseline)
    sft-mix       LoRA on positives and negatives, negatives unmarked
    neg-then-pos  the neg adapter merged into the base, then LoRA on positives (no gate)
    ul            positives with CE + `unlikelihood` x unlikelihood loss on negatives
    dpo           sft-pos merged, then a LoRA trained with DPO on (pos, neg) pairs, sft-pos as reference
    redi          sft-pos merged, then a LoRA trained with the REDI objective on positives and negatives
    nat           the NAT model itself (neg + pos + gate) used as the student
    kd            distillation from the NAT teacher with beta fixed to 0.5 (plain KD)
    nat+nce       distillation with the scored beta (NCE)
Each seed re-runs every training stage with engine.seed = data.seed = seed (neg and nat too, as
the teacher is part of the method), then evaluates each variant with stage eval (greedy, SC, ASC;
the ranker, trained once, is shared). Stage outputs live in OUT/seed<s>/, so a rerun resumes.
Stages run on this node's GPUs when torch sees any (`ablation.nproc` processes), else on CPU.
Results: results.json (per variant and metric: every seed's value, mean, std (n - 1), a 95% CI from a
hierarchical bootstrap over seeds then questions, the CI over questions alone, and the paired difference
from sft-pos with its CI), results.md (the table, with the share of samples cut by eval.max_new_tokens)
and ablation.png (bar chart with the CIs as error bars).
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
from train.stats import bootstrap_ci, hierarchical_bootstrap_ci, seed_std

NEEDS = {"neg": {"neg-then-pos", "nat", "kd", "nat+nce"}, "nat": {"nat", "kd", "nat+nce"}, "score": {"kd", "nat+nce"}}


def _log(msg: str) -> None:
    print(f"[ablation] {msg}", flush=True)


def run_ablation(cfg: AblationConfig) -> dict:
    a = cfg.ablation
    out = Path(cfg.engine.output_dir)
    configs = Path(a.configs)
    variants = list(a.variants)
    for name in ("sft", "neg", "nat", "score", "distill", "eval", *({"dpo", "redi"} & set(variants))):
        if not (configs / f"{name}.yaml").is_file():
            raise ConfigError(f"ablation.configs: {configs} has no {name}.yaml")
    t0 = time.time()
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
    if wanted & {"sft-pos", "dpo", "redi"}:
        sft_pos = stage("sft", "sft", "sft-pos", [*student, "sft.labels=[pos]"])
        models["sft-pos"] = sft_pos
    if "sft-mix" in wanted:
        models["sft-mix"] = stage("sft", "sft", "sft-mix", [*student, "sft.labels=[pos,neg]"])
    if "ul" in wanted:
        models["ul"] = stage("sft", "sft", "ul", [*student, "sft.labels=[pos,neg]",
                                                      f"sft.unlikelihood={a.unlikelihood}"])
    if "neg-then-pos" in wanted:
        models["neg-then-pos"] = stage("sft", "sft", "neg-then-pos",
                                       [f"model.path={_merged(neg, d / 'neg-merged')}",
                                        f"model.tokenizer={a.base_model}", *common, "sft.labels=[pos]"])
    for name in ("dpo", "redi"):  # both start from the SFT model (merged): TRL's and the REDI paper's recipe
        if name in wanted:
            models[name] = stage(name, name, name, [f"model.path={_merged(sft_pos, d / 'sft-pos-merged')}",
                                                    f"model.tokenizer={a.base_model}", *common])
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


def _merged(adapter_stage: Path, target: Path) -> Path:
    """The stage's adapter merged into its base (once): a model dir that a new LoRA can train on."""
    if not (target / "config.json").is_file():
        _log(export(adapter_stage, target))
    return target


METRICS = {"greedy": lambda r: float(r["greedy"]["correct"]), "sc": lambda r: float(r["votes"]["sc"]),
           "asc_score": lambda r: float(r["votes"]["asc_score"]), "pass_at_n": lambda r: float(r["votes"]["pass_at_n"]),
           # share of the rationales cut by eval.max_new_tokens (a length limit, not a wrong answer): the sampled
           # ones, or the greedy one with eval.n=0
           "unfinished": lambda r: float(np.mean([not s.get("finished", True)
                                                  for s in r.get("samples") or [r["greedy"]]]))}
BASELINE = "sft-pos"


def per_question(eval_dir: Path) -> dict[str, dict[str, float]]:
    """{qid: {metric: 0..1}} from an eval's predictions.jsonl (SC and ASC give split ties fractional credit)."""
    from train.stages.evaluate import PREDICTIONS

    out = {}
    for line in (eval_dir / PREDICTIONS).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out[r["qid"]] = {k: f(r) for k, f in METRICS.items() if k in ("greedy", "unfinished") or k in r["votes"]}
    return out


def compare(evals: dict[str, list[Path]], baseline: str = BASELINE, n_boot: int = 2000) -> dict:
    """Per variant and metric, in %, from each variant's eval dirs (one per training seed, the same questions):
    each seed's accuracy, their mean and sample std (n - 1), a 95% CI from a hierarchical bootstrap (seeds, then
    questions: the spread a user rerunning on another machine should expect) and, for reference, the CI over
    questions alone (seeds averaged). With `baseline` among the variants, every other variant also gets `diff`:
    its paired difference from the baseline (same seeds and questions resampled) with its CI."""
    scores = {v: [per_question(d) for d in dirs] for v, dirs in evals.items()}
    variants = list(evals)
    if len({len(runs) for runs in scores.values()}) != 1:
        raise ValueError(f"every variant needs the same number of seeds: {({v: len(r) for v, r in scores.items()})}")
    qids = sorted(set.intersection(*(set(d) for runs in scores.values() for d in runs)))
    # a variant evaluated greedy only (eval.n=0) has no SC, ASC or pass@n
    keys = {v: [k for k in METRICS if all(k in run[qids[0]] for run in scores[v])] for v in variants}
    # [seeds, questions] in % per variant and metric
    m = {(v, k): 100 * np.array([[run[q][k] for q in qids] for run in scores[v]]) for v in variants for k in keys[v]}
    results: dict[str, dict] = {}
    for v in variants:
        results[v] = {}
        for key in keys[v]:
            x = m[v, key]
            entry = {"values": x.mean(1).tolist(), "mean": float(x.mean()), "std": seed_std(x),
                     "ci": list(hierarchical_bootstrap_ci(x, n_boot)),
                     "ci_questions": list(bootstrap_ci(x.mean(0), n_boot)), "questions": len(qids),
                     "seeds": len(x)}
            if (baseline, key) in m and v != baseline and key != "unfinished":
                d = x - m[baseline, key]
                entry["diff"] = {"mean": float(d.mean()), "ci": list(hierarchical_bootstrap_ci(d, n_boot))}
            results[v][key] = entry
    return results


def aggregate(out: Path, seeds: list[int], variants: list[str], n_boot: int = 2000) -> dict:
    """`compare` over an ablation's output dir: OUT/seed<s>/eval/<variant> for each seed and variant."""
    return compare({v: [out / f"seed{s}" / "eval" / v for s in seeds] for v in variants}, BASELINE, n_boot)


def _columns(has_ranker: bool) -> list[tuple[str, str]]:
    cols = [("greedy", "greedy"), ("sc", "SC"), ("pass_at_n", "pass@n")]
    return cols[:2] + [("asc_score", "ASC")] + cols[2:] if has_ranker else cols


def _title(title: str, n: int) -> str:
    return title.replace("n", str(n)) if title == "pass@n" else (f"{title}@{n}" if title in ("SC", "ASC") else title)


def results_table(results: dict, n: int, has_ranker: bool, seeds: int, minutes: float | None = None,
                  split: str = "test") -> str:
    """Mean [95% CI] per metric, the paired difference from sft-pos [95% CI] (but for pass@n), and the share of
    sampled rationales cut by eval.max_new_tokens."""
    cols = [(key, title) for key, title in _columns(has_ranker) if any(key in m for m in results.values())]
    head = ["variant"]
    for key, title in cols:
        head.append(_title(title, n))
        if key != "pass_at_n":
            head.append(f"Δ {_title(title, n)} vs {BASELINE}")
    unfinished = all("unfinished" in metrics for metrics in results.values())
    head += ["unfinished %"] if unfinished else []
    rule = "|" + " --- |" * len(head)
    questions = next(iter(next(iter(results.values())).values()))["questions"]
    how = ("hierarchical bootstrap: training seeds, then questions" if seeds > 1
           else "bootstrap over questions; one training seed, so no seed variance")
    took = f"; {minutes:.1f} min in all" if minutes is not None else ""
    lines = [f"Accuracy in % on {questions} {split} questions x {seeds} seed(s): mean [95% CI], and the paired "
             f"difference from {BASELINE} [95% CI] ({how}){took}.", "", "| " + " | ".join(head) + " |", rule]
    for v, metrics in results.items():
        cells = [v]
        for key, _ in cols:
            m = metrics.get(key)  # None: this variant was evaluated greedy only
            cells.append(f"{m['mean']:.1f} [{m['ci'][0]:.1f}, {m['ci'][1]:.1f}]" if m else "-")
            if key != "pass_at_n":
                d = m.get("diff") if m else None
                cells.append(f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]" if d else "")
        cells += [f"{metrics['unfinished']['mean']:.1f}"] if unfinished else []
        lines.append("| " + " | ".join(cells) + " |")
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
        means = np.array([results[v][key]["mean"] for v in variants])
        ci = np.array([results[v][key]["ci"] for v in variants])
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, means, width, yerr=[means - ci[:, 0], ci[:, 1] - means],
               capsize=3, label=title)
    ax.set_xticks(x, variants)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Negative-data ablation (mean, 95% CI: seeds, then questions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: AblationConfig) -> int:
    run_ablation(cfg)
    return 0
