"""Export a stage output as a Hugging Face model dir; the same as `tdg export` (see --help)."""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
