"""Scorer scaling: samples/s of stage score on 1 rank vs 2 ranks (CPU, one thread per rank).

Both runs score every positive sample of the demo's prepared data with the demo's NAT teacher
(full copy per rank, no ZeRO), launched with torchrun like a user would. Time is the stage's own
wall time (DONE.json `seconds`: tokenizing, model load, scoring, verification), so fixed costs
count against scaling. Ideal is 2.0x.
Usage: python bench/score_scaling.py [--demo demo_out]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, demo_outputs, record  # noqa: E402

from train.launch import launch_stage  # noqa: E402
from train.manifest import read_done  # noqa: E402


def run_score(demo: Path, out: Path, nproc: int) -> dict:
    overrides = [f"data.path={demo / 'prepared'}", f"score.nat_dir={demo / 'nat'}", f"engine.output_dir={out}",
                 "engine.progress=false", "engine.ds_config=none"]
    launch_stage("score", CONFIGS / "score.yaml", overrides, nproc, f"bench score x{nproc}", "the bench stops here")
    return read_done(out)["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demo", default="demo_out", help="a finished `tdg demo` output (run first if absent)")
    args = ap.parse_args()
    demo = demo_outputs(args.demo)
    with tempfile.TemporaryDirectory() as tmp:
        one = run_score(demo, Path(tmp) / "one", 1)
        two = run_score(demo, Path(tmp) / "two", 2)
    r1, r2 = one["samples"] / one["seconds"], two["samples"] / two["seconds"]
    record(f"scorer scaling, {one['samples']} samples, tiny NAT teacher (demo), 1 thread per rank",
           f"1 rank {r1:.1f} samples/s", f"2 ranks {r2:.1f} samples/s ({r2 / 2:.1f} per rank)",
           f"{r2 / r1:.2f}x (ideal 2x)", "-")


if __name__ == "__main__":
    main()
