"""Self-consistency against sampling temperature for the demo's student: which eval.temperature to ship.

A weak model's samples at a low temperature repeat its greedy answer; at a high one they scatter
and votes rarely agree. This runs stage eval (the real path: 2 processes, math-verify grading)
on the first `--questions` test questions of a finished `tdg demo` at each temperature and prints
greedy, SC@n, ASC@n and pass@n with 95% bootstrap CIs over questions, then records one row per
temperature (baseline: the shipped configs/tiny/eval.yaml temperature).

    python bench/demo_temperature.py --demo demo_out --temperatures 0.3,0.5,0.7,1.0 --questions 300
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
    ap.add_argument("--questions", type=int, default=300, help="first N test questions")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default="/tmp/tdg_temperature")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    demo, work = Path(args.demo), Path(args.work)
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        out = work / f"T{t}"
        launch_stage("eval", CONFIGS / "eval.yaml",
                     [f"eval.model={demo / 'export'}", f"eval.test={demo / 'raw' / 'test'}",
                      f"eval.ranker={demo / 'ranker'}", f"eval.temperature={t}",
                      f"eval.max_questions={args.questions}", f"engine.output_dir={out}"], args.nproc,
                     f"temperature {t}", "rerun to resume")
        scores = per_question(out)
        row = {"temperature": t, "questions": len(scores)}
        for key in ("greedy", "sc", "asc_score", "pass_at_n"):
            v = 100 * np.array([s[key] for s in scores.values()])
            row[key] = (float(v.mean()), *bootstrap_ci(v))
        rows.append(row)
    print(f"\n| temperature | greedy | SC | ASC | pass@n |  ({rows[0]['questions']} questions, 95% CI)\n"
          "| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['temperature']} | " + " | ".join(f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in
                                                     (r[k] for k in ("greedy", "sc", "asc_score", "pass_at_n")))
              + " |")
    (work / "temperature.json").write_text(json.dumps(rows, indent=1))
    if args.no_record:
        return
    import yaml

    shipped = yaml.safe_load((CONFIGS / "eval.yaml").read_text())["eval"]["temperature"]
    base = next((r for r in rows if r["temperature"] == shipped), rows[0])
    for r in rows:
        record("demo student: SC@8 against sampling temperature (bench/demo_temperature.py)",
               f"T {base['temperature']}: SC {base['sc'][0]:.1f}", f"T {r['temperature']}: SC {r['sc'][0]:.1f} "
               f"[{r['sc'][1]:.1f}, {r['sc'][2]:.1f}], ASC {r['asc_score'][0]:.1f}, greedy {r['greedy'][0]:.1f}, "
               f"pass@8 {r['pass_at_n'][0]:.1f} ({r['questions']} questions)",
               f"{r['sc'][0] - base['sc'][0]:+.1f} points", "choose eval.temperature: SC@8 >= greedy")


if __name__ == "__main__":
    main()
