"""Inspect a stage-score output: beta summary, a histogram PNG, and the top/bottom samples by beta.

    python tools/inspect_scores.py SCORES_DIR [--png beta_hist.png] [--top 5] [--json summary.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.errors import TdgError
from train.score_report import format_report, histogram_png, read_betas, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scores", metavar="SCORES_DIR", help="output directory of stage score")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="histogram of beta to write (default: SCORES_DIR/beta_hist.png)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="samples listed at each end of the beta range")
    p.add_argument("--bins", type=int, default=40, help="histogram bins")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the summary numbers as JSON")
    args = p.parse_args(argv)
    try:
        betas = read_betas(args.scores)
        png = Path(args.png) if args.png else Path(args.scores) / "beta_hist.png"
        histogram_png(betas, png, bins=args.bins)
        print(format_report(args.scores, betas, args.top))
        print(f"\nhistogram: {png}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary(betas), indent=1))
    except TdgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
