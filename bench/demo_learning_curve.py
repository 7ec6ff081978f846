"""Candidate bases for `tdg demo`: each pre-trained base and its sft-pos student, scored on the validation split.

Chooses what the demo's tiny Llama is pre-trained on (issue 25: a base that has the skills but not the task).
A candidate is `LEVELS/QUESTIONS/EPOCHS[/STYLE[/WORDING]]`: QUESTIONS fresh questions of those levels, for EPOCHS
epochs, written as STYLE `chains` (their gold worked solutions), `drills` (each answer alone, with no chain of
thought, plus the drill of its bare arithmetic) or `cued` (worked solutions behind a cue sentence the task never
uses, and every third question in the task's words with the answer alone), in WORDING `task` (the task's own
sentences) or `other` (the same operations said in other sentences). Each candidate runs the demo's own steps in
its own output dir, as `tdg demo` runs them: the demo's splits for the same seed, tokenizer, prepare, pre-training
(stage sft, full, 2 processes), sft-pos (LoRA on the teacher's positives, configs/tiny/sft.yaml), then stage eval
(greedy) of the base and of sft-pos on the VALIDATION split (its own seed; the test split is never read), and their
paired difference.

Targets, fixed before any other variant was run: base below ~50% greedy; sft-pos at least 10 points above it
with a paired CI that excludes 0; the whole demo within ~12 minutes on 2 cores.

    python bench/demo_learning_curve.py --candidates 12/47000/2,12345/25000/1/drills,12345/47000/2/chains/other
Prints a table and records one RESULTS.md row per candidate (baseline: the first candidate's base).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from train.ablation import compare  # noqa: E402
from train.manifest import read_done  # noqa: E402
from train.stages.demo import DemoOptions, evaluate, prepare_base, train_sft_pos  # noqa: E402


def parse_candidate(text: str) -> tuple[tuple[int, ...], int, int, str, str]:
    """'12/47000/2' -> ((1, 2), 47000, 2, 'chains', 'task'); then optionally the style and the wording
    ('12345/25000/1/drills', '12345/47000/2/chains/other')."""
    levels, questions, epochs, *rest = text.split("/")
    return (tuple(int(c) for c in levels), int(questions), int(epochs), rest[0] if rest else "chains",
            rest[1] if len(rest) > 1 else "task")


def run_candidate(text: str, args) -> dict:
    levels, questions, epochs, style, wording = parse_candidate(text)
    out = Path(args.work) / text.replace("/", "_")
    opts = DemoOptions(output=str(out), pretrain_levels=levels, pretrain_questions=questions,
                       pretrain_epochs=epochs, pretrain_style=style, pretrain_wording=wording,
                       valid_questions=args.valid)
    t0 = time.time()
    prepare_base(opts, out)
    t_base = time.time() - t0
    train_sft_pos(opts, out)
    results = compare({name: [evaluate(opts, out, name, model, "valid", overrides=("eval.n=0",))]
                       for name, model in (("base", out / "pretrain" / "model"), ("sft-pos", out / "sft-pos"))},
                      baseline="base")
    base, sft = results["base"]["greedy"], results["sft-pos"]["greedy"]
    row = {"candidate": text, "base": base["mean"], "base_ci": base["ci"], "sft_pos": sft["mean"],
           "sft_pos_ci": sft["ci"], "gain": sft["diff"]["mean"], "gain_ci": sft["diff"]["ci"],
           "unfinished_base": results["base"]["unfinished"]["mean"],
           "unfinished_sft": results["sft-pos"]["unfinished"]["mean"],
           "pretrain_s": read_done(out / "pretrain")["metrics"]["seconds"],
           "sft_s": read_done(out / "sft-pos")["metrics"]["seconds"], "data_and_base_s": round(t_base),
           "questions": base["questions"]}
    row["by_level"] = {name: {lv: m["greedy"] for lv, m in
                              json.loads((out / "eval-valid" / name / "metrics.json").read_text())["by_level"].items()}
                       for name in ("base", "sft-pos")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="12/47000/2", help="LEVELS/QUESTIONS/EPOCHS,... (first: the baseline)")
    ap.add_argument("--valid", type=int, default=600, help="validation questions (the demo's default split)")
    ap.add_argument("--work", default="/tmp/tdg_candidates", help="one demo output dir per candidate under here")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    rows = [run_candidate(c, args) for c in args.candidates.split(",")]
    print(f"\n| candidate | base greedy | sft-pos greedy | gain [95% CI] | pre-train s | sft s |  "
          f"({rows[0]['questions']} validation questions)\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['candidate']} | {r['base']:.1f} | {r['sft_pos']:.1f} | {r['gain']:+.1f} [{r['gain_ci'][0]:+.1f}, "
              f"{r['gain_ci'][1]:+.1f}] | {r['pretrain_s']} | {r['sft_s']} |")
    (Path(args.work) / "candidates.json").write_text(json.dumps(rows, indent=1))
    if args.no_record:
        return
    first = rows[0]
    for r in rows:
        record("demo base candidates: base and sft-pos greedy % on the validation split "
               "(bench/demo_learning_curve.py)",
               f"{first['candidate']}: base {first['base']:.1f}",
               f"{r['candidate']} (levels/questions/epochs): base {r['base']:.1f} [{r['base_ci'][0]:.1f}, "
               f"{r['base_ci'][1]:.1f}], sft-pos {r['sft_pos']:.1f} [{r['sft_pos_ci'][0]:.1f}, "
               f"{r['sft_pos_ci'][1]:.1f}], gain {r['gain']:+.1f} [{r['gain_ci'][0]:+.1f}, {r['gain_ci'][1]:+.1f}]; "
               f"by level base {r['by_level']['base']}, sft-pos {r['by_level']['sft-pos']}; pre-train "
               f"{r['pretrain_s']} s, sft-pos {r['sft_s']} s; unfinished {r['unfinished_base']:.1f}% / "
               f"{r['unfinished_sft']:.1f}% ({r['questions']} questions)",
               f"{r['base'] - first['base']:+.1f} points (base)",
               "base < ~50% greedy and sft-pos >= base + 10 with the paired CI above 0")


if __name__ == "__main__":
    main()
