"""Export a stage output as a Hugging Face model dir; the same as `tdg export` (see --help), and it ends the same
way (train.engine.process_exit)."""

import sys

from train.cli import main
from train.engine.process_exit import run_then_exit

if __name__ == "__main__":
    run_then_exit(lambda: main(["export", *sys.argv[1:]]))
