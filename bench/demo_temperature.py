"""Self-consistency against sampling temperature for the demo's student: which eval.temperature to ship.

A weak model's samples at a low temperature repeat its greedy answer; at a high one they scatter
and votes rarely agree. This runs stage eval (the real path: 2 processes, math-verify grading)
on the demo's **validation split** (its own seed; the test split is never read for a choice) at each
temperature and prints greedy, SC@n, ASC@n and pass@n with 95% bootstrap CIs over questions, and each
temperature's paired SC@n difference from the shipped one; then records one row per temperature.

The rule, fixed before the run: keep the shipped temperature unless another one's SC@n is higher with the
paired 95% CI above 0; among several such, the highest SC@n. The chosen value is printed.

    python bench/demo_temperature.py --demo demo_out --temperatures 0.3,0.5,0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from train.ablation import per_question  # noqa: E402
from train.launch import launch_stage  # noqa: E402
from train.stats import bootstrap_ci  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo_out", help="a finished tdg demo output dir")
    ap.add_argument("--temperatures", default="0.3,0.5,0.7,1.0")
    ap.add_argument("--split", default="valid", choices=["valid", "test"],
                    help="the demo's split to evaluate on (valid: choose on it; test: only to report)")
    ap.add_argument("--questions", type=int, default=0, help="first N questions of the split (0: all)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default=None,
                    help="where each temperature's eval goes (default DEMO/temperature-SPLIT: a finished eval there is "
                         "reused, so a shared dir would serve one demo's results for another's student)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    demo = Path(args.demo)
    work = Path(args.work) if args.work else demo / f"temperature-{args.split}"
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        out = work / f"T{t}"
        launch_stage("eval", CONFIGS / "eval.yaml",
                     [f"eval.model={demo / 'export'}", f"eval.test={demo / 'raw' / args.split}",
                      f"eval.ranker={demo / 'ranker'}", f"eval.temperature={t}",
                      f"eval.max_questions={args.questions}", f"engine.output_dir={out}"], args.nproc,
                     f"temperature {t}", "rerun to resume")
        scores = per_question(out)
        row = {"temperature": t, "questions": len(scores), "per_question_sc": {q: s["sc"] for q, s in scores.items()}}
        for key in ("greedy", "sc", "asc_score", "pass_at_n"):
            v = 100 * np.array([s[key] for s in scores.values()])
            row[key] = (float(v.mean()), *bootstrap_ci(v))
        rows.append(row)
    import yaml

    shipped = yaml.safe_load((CONFIGS / "eval.yaml").read_text())["eval"]["temperature"]
    base = next((r for r in rows if r["temperature"] == shipped), rows[0])
    for r in rows:
        diff = 100 * np.array([r["per_question_sc"][q] - base["per_question_sc"][q] for q in base["per_question_sc"]])
        r["sc_diff"] = (float(diff.mean()), *bootstrap_ci(diff))
    better = [r for r in rows if r["sc_diff"][1] > 0]
    chosen = max(better, key=lambda r: r["sc"][0]) if better else base
    print(f"\n| temperature | greedy | SC | ASC | pass@n | SC - SC at T {base['temperature']} |  "
          f"({rows[0]['questions']} {args.split} questions, 95% CI)\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['temperature']} | " + " | ".join(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" if k == "sc_diff" else
                                                     f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for k, (m, lo, hi) in
                                                     ((k, r[k]) for k in ("greedy", "sc", "asc_score", "pass_at_n",
                                                                          "sc_diff")))
              + " |")
    print(f"chosen (rule: keep T {base['temperature']} unless another's SC is higher with the paired CI above 0): "
          f"T {chosen['temperature']}")
    (work / "temperature.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "per_question_sc"} for r in rows], indent=1))
    if args.no_record:
        return
    for r in rows:
        record(f"demo student: SC@8 against sampling temperature, {args.split} split (bench/demo_temperature.py)",
               f"T {base['temperature']}: SC {base['sc'][0]:.1f}", f"T {r['temperature']}: SC {r['sc'][0]:.1f} "
               f"[{r['sc'][1]:.1f}, {r['sc'][2]:.1f}], ASC {r['asc_score'][0]:.1f}, greedy {r['greedy'][0]:.1f}, "
               f"pass@8 {r['pass_at_n'][0]:.1f} ({r['questions']} questions)",
               f"{r['sc_diff'][0]:+.1f} [{r['sc_diff'][1]:+.1f}, {r['sc_diff'][2]:+.1f}] points (paired)",
               f"keep T {base['temperature']} unless SC higher with paired CI > 0: chose T {chosen['temperature']}")


if __name__ == "__main__":
    main()
