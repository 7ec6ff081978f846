"""Shared fixtures: real files on disk, a real sentencepiece tokenizer trained here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tdg-math-gpt35"


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    from train.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("raw"), n_train=60, n_test=15, seed=1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, synthetic_raw) -> Path:
    from train.data.tokenizer import train_tokenizer

    texts = []
    for f in sorted((synthetic_raw / "train").rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["question"], rec["answer"], *rec["generated_answer"]]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared GPT-3.5 rationales not present at {SHARED_DATA}")
    return SHARED_DATA


def write_lines(path: Path, lines: list) -> Path:
    """Write jsonl: dicts are dumped, bytes and str are written as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    return path
