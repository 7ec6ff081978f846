"""The docs site builds with every link checked, and every `tdg` command the docs show still parses."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "reliability" / "index.html").is_file()


def shown_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv after `tdg` or `-m train`) of every command in an indented code block, continuation lines
    joined."""
    found, lines = [], page.read_text().splitlines()
    k = 0
    while k < len(lines):
        start, text = k, lines[k]
        while text.endswith("\\") and k + 1 < len(lines):
            k += 1
            text = text[:-1] + " " + lines[k].strip()
        k += 1
        m = re.match(r"^ {4,}.*?(?:^|\s|/)(?:tdg|-m train) (.*)$", text)  # tdg ..., python -m train ...
        if m:
            found.append((start + 1, shlex.split(m.group(1), comments=True)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_tdg_command_in_the_docs_parses(page):
    """Parsed by the real CLI (flags, choices, subcommands): the docs cannot drift from it. Running them is the
    other tests' work (the demo, every stage, export, plan and sample run there on CPU)."""
    from train.cli import build_parser

    parser = build_parser()
    for line, argv in shown_commands(page):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}:{line}: tdg {' '.join(argv)} does not parse")


def test_the_docs_show_commands_at_all():
    assert sum(len(shown_commands(p)) for p in PAGES) >= 8  # 9 when written


def test_the_docs_commands_that_need_only_this_checkout_run():
    """`tdg plan` over the shipped configs needs nothing but the repository: run as shown."""
    from train.cli import main

    runnable = [(p.name, line, argv) for p in PAGES for line, argv in shown_commands(p) if argv[0] == "plan"]
    assert runnable
    for page, line, argv in runnable:
        assert main(argv) == 0, f"{page}:{line}: tdg {' '.join(argv)}"
