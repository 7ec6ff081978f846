"""Ship a demo's pre-trained base: copy DEMO_OUT/pretrain/model and its identity into configs/tiny/base.

    tdg demo --train-base --output DEMO_OUT      # pre-trains the base here (15 minutes on 2 cores)
    python tools/publish_demo_base.py DEMO_OUT   # then commit configs/tiny/base

Needed after any change to the synthetic generator, the tokenizer, configs/tiny/model.json or pretrain.yaml:
tests/test_demo_base.py fails until the shipped base is this recipe's again (train.demo_base says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.demo_base import publish
from train.demo_options import SHIPPED_BASE
from train.errors import TdgError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_out", metavar="DEMO_OUT", help="output dir of a tdg demo --train-base run")
    p.add_argument("--dest", default=str(SHIPPED_BASE), metavar="DIR", help=f"where to write (default {SHIPPED_BASE})")
    args = p.parse_args(argv)
    try:
        record = publish(Path(args.demo_out), Path(args.dest))
    except TdgError as e:
        print(f"publish_demo_base: {e}", file=sys.stderr)
        return 2
    m = record["done"]["metrics"]
    print(f"{args.dest}: the base of {args.demo_out} ({m['global_step']} steps on {m['world_size']} ranks, loss "
          f"{m['first_loss']:.3f} -> {m['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
