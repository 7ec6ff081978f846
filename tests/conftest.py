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


def mistral_sentencepiece() -> Path:
    """Mistral-7B's 32,000-piece sentencepiece model, shipped in the `mistral-common` package (a test dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "mistral-common is a test dependency: bash scripts/setup.sh dev"
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="session")
def llama32k_dir(tmp_path_factory) -> Path:
    """A real 32,000-piece Llama-family tokenizer (Mistral-7B's) as a Hugging Face Llama tokenizer dir."""
    from train.data.tokenizer import tokenizer_from_sentencepiece

    out = tmp_path_factory.mktemp("llama32k")
    tokenizer_from_sentencepiece(mistral_sentencepiece(), out)
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


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, synthetic_raw) -> Path:
    from train.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(PrepareOptions(inputs=[str(synthetic_raw / "train")], output=str(out), grader="hendrycks", workers=1,
                           show_progress=False))
    return out


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from train.models.loading import build_tiny_model

    return build_tiny_model(REPO / "configs" / "tiny" / "model.json", tokenizer_dir,
                            tmp_path_factory.mktemp("base") / "model", seed=0)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def zero3_partitioned(tmp_path_factory) -> Path:
    """The shipped ds_configs/zero3.json with persistence threshold 0. The shipped threshold (10,000
    elements) keeps almost every weight of the tiny test models whole on each rank, so tests that
    should exercise ZeRO-3 partitioning would barely touch it."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partitioned.json"
    path.write_text(json.dumps(cfg))
    return path


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def stage_env() -> dict:
    """The environment of a launched stage: CPU DeepSpeed, and none of this process's rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def stage_cmd(stage: str, overrides: list[str], nproc: int = 2) -> list[str]:
    import sys

    if nproc == 1:
        return [sys.executable, "-m", "train", stage, *overrides]
    return torchrun_cmd(nproc, "-m", "train", stage, *overrides)


def torchrun_cmd(nproc: int, *program: str) -> list[str]:
    """torchrun on this machine with `nproc` processes and a free rendezvous port, running `program`."""
    import sys

    from train.engine.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *program]


def run_stage(stage: str, overrides: list[str], nproc: int = 2, timeout: int = 600):
    """Run a stage as users do (torchrun for 2 ranks); return the CompletedProcess."""
    import subprocess

    return subprocess.run(stage_cmd(stage, overrides, nproc), env=stage_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, base_model_dir):
    """A NAT teacher dir whose neg branch, pos branch and gate are random and far from zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.models.adapters import expected_lora_shapes
    from train.models.nat import add_nat_layers, gate_shapes, load_lora_branch, save_nat_dir

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)

    def base():
        return AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)

    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    neg = get_peft_model(base(), peft_cfg)
    for name, p in neg.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    neg.save_pretrained(root / "neg")
    model = base()
    expected = expected_lora_shapes(model, ["q_proj", "v_proj"], 4)
    layers = add_nat_layers(model, ["q_proj", "v_proj"], 4, 8, 0.0, 16, 0.5, 1.0)
    load_lora_branch(layers, root / "neg", "neg")
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B_pos.weight, std=0.5)
        torch.nn.init.normal_(layer.gate_v2.weight, std=0.5)
    save_nat_dir(root / "nat", layers, peft_cfg, str(base_model_dir), str(root / "neg"), expected,
                 gate_shapes(layers))
    return root / "nat"
