import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, stage_env
from train.cli import STAGES, build_parser
from train.config import get_dotted


def _help(*args) -> str:
    return subprocess.run([sys.executable, "-m", "train", *args, "--help"], capture_output=True, text=True,
                          check=True).stdout


def test_every_subcommand_has_help_for_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"tdg {name}: option {action.dest} has no help"
    assert set(STAGES) <= set(sub.choices)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_lists_and_explains_every_config_key(stage):
    import dataclasses
    import importlib

    text = _help(stage)
    cls = getattr(importlib.import_module("train.config"), STAGES[stage][2])

    def keys(c, prefix=""):
        import typing

        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    for key in keys(cls):
        m = re.search(rf"^  {re.escape(key)} \(.*\)\n      \S", text, re.M)
        assert m, f"tdg {stage} --help: {key} is missing or has no explanation"
    # the override example names keys this command takes (sample and eval used to show optim.lr)
    example = re.search(r"dotted overrides, e\.g\.\s+(.+?)\s*\n\s*\n", text, re.S).group(1).split()
    assert example
    for item in example:
        get_dotted(cls(), item.split("=")[0])


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "train", "demo", "--output", str(out), "--questions", "60",
           "--test-questions", "15", "--valid-questions", "20", "--pretrain-questions", "300", "--workers", "1",
           "--ablation", "--ablation-seeds", "1", "--ablation-steps", "2", "--ablation-questions", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("prepared", "pretrain", "sft-pos", "neg", "nat", "score", "distill", "ranker", "eval-test/base",
                  "eval-test/sft-pos", "eval-test/nat+nce"):
        assert (out / stage / "DONE.json").is_file(), stage
    # the teacher's regime table, then the student beside the base and sft-pos, with CIs and paired differences
    assert "q no pos" in result.stdout and "level Level 5" in result.stdout
    assert "| variant | greedy | Δ greedy vs sft-pos | SC@8 |" in result.stdout
    for variant in ("base", "sft-pos", "nat+nce"):
        assert f"| {variant} |" in result.stdout
    assert json.loads((out / "eval-test" / "nat+nce" / "metrics.json").read_text())["overall"]["questions"] == 15
    results = json.loads((out / "results.json").read_text())
    assert "sc" not in results["base"] and "sc" in results["nat+nce"]  # base and sft-pos: greedy only
    assert results["nat+nce"]["greedy"]["questions"] == 15
    assert (out / "nat" / "nat.json").is_file() and list((out / "nat" / "tb").glob("events*"))
    assert (out / "export" / "config.json").is_file() and (out / "export" / "README.md").is_file()
    assert json.loads((out / "neg" / "DONE.json").read_text())["metrics"]["world_size"] == 2
    # its base, published, is the base this demo pre-trains: the recipe DONE.json records is the one it loads
    from train import demo_base
    from train.stages.demo import DemoOptions, base_identity

    published = demo_base.publish(out, tmp_path / "base")
    assert "pre-trained from or under something else" in result.stdout  # not the shipped base's recipe
    assert demo_base.identity_changes(published, base_identity(DemoOptions(output=str(out)), out)) == []
    again = subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=900)
    # the reduced ablation (1 seed, 2 steps per stage): every variant has a row, a chart exists
    table = (out / "ablation" / "results.md").read_text()
    for variant in ("base", "sft-pos", "sft-mix", "neg-then-pos", "ul", "dpo", "redi", "nat", "kd", "nat+nce"):
        assert f"| {variant} |" in table and f"| {variant} |" in result.stdout
    assert (out / "ablation" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun resumes: 10 demo stages (3 evals) + 11 ablation trainings + 10 ablation evals, all found finished
    assert again.returncode == 0 and again.stdout.count("already has DONE.json") == 31


def test_version_and_evals_backend_flags(capsys):
    from train import __version__
    from train.cli import main as tdg

    with pytest.raises(SystemExit) as e:
        tdg(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tdg {__version__}"
    for key, want in (("eval.backend", "openai"), ("eval.server.base_url", "http://node:8000/v1")):
        assert tdg(["eval", "--model", "m", "--test", "t.jsonl", "--backend", "openai", "--base-url",
                    "http://node:8000/v1", "--print", key]) == 0
        assert capsys.readouterr().out.strip() == want


def test_errors_in_the_users_words(tmp_path, capsys):
    """The flag the user typed, not the config key behind it; a teacher name without a server says how."""
    from train.cli import main as tdg

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"problem": "What is 1+1?", "solution": "\\boxed{2}"}) + "\n")
    assert tdg(["sample", "--model", "teacher", "--questions", str(q)]) == 2
    assert "tdg sample: --output DIR is required" in capsys.readouterr().err
    assert tdg(["sample", "--model", "teacher", "--questions", str(q), "--output", str(tmp_path / "s")]) == 2
    assert "sample.model: teacher does not exist here; for a model served by an OpenAI-compatible server pass " \
           "--base-url URL" in capsys.readouterr().err
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"question": "q", "rationale": "\\boxed{2}", "gold": "2"}) + "\n")
    assert tdg(["prepare", "--input", str(flat), "--output", str(tmp_path / "p"), "--prompt-format", "chat"]) == 2
    assert "--prompt-format chat needs --tokenizer" in capsys.readouterr().err
    assert tdg(["eval", "--model", "m", "--test", str(q), "--fields", "question=problem,question=prompt"]) == 2
    assert "--fields (eval.fields): question is given twice (question=problem and question=prompt)" in \
        capsys.readouterr().err
