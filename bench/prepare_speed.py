"""Prepare speed on the GPT-3.5 MATH rationales: math-verify with N workers vs 1 worker.

Goal (issue 2/8): all 60,000 rationales in under 2 minutes on 2 cores.
Usage: python bench/prepare_speed.py [--workers 2] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, record  # noqa: E402

from train.data.prepare import PrepareOptions, prepare  # noqa: E402


def timed(workers: int, grader: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = prepare(PrepareOptions(inputs=[str(SHARED_DATA)], output=f"{tmp}/out", grader=grader,
                                       workers=workers, show_progress=False))
        return time.perf_counter() - t0, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the 1-worker baseline")
    args = ap.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"needs {SHARED_DATA}")
    t, stats = timed(args.workers, "math-verify")
    n = stats["subjects"]["ALL"]["rationales"]
    pos = stats["subjects"]["ALL"]["positives"]
    print(f"{args.workers} workers: {t:.1f} s, {n / t:.0f} rationales/s, positive fraction {pos / n:.3f}")
    if args.skip_baseline:
        record("prepare 60k GPT-3.5 rationales (math-verify)", "-", f"{t:.1f} s ({n / t:.0f}/s)", "-",
               "< 120 s: " + ("met" if t < 120 else f"missed by {t - 120:.0f} s"))
        return
    t1, _ = timed(1, "math-verify")
    record("prepare 60k GPT-3.5 rationales (math-verify)", f"1 worker {t1:.1f} s",
           f"{args.workers} workers {t:.1f} s ({n / t:.0f}/s)", f"{t1 / t:.2f}x",
           "< 120 s: " + ("met" if t < 120 else f"missed by {t - 120:.0f} s"))


if __name__ == "__main__":
    main()
