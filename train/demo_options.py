"""`tdg demo`'s options, apart from the demo itself so that the command line can show their defaults without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.data.synthetic import PRETRAIN_LEVELS, PRETRAIN_STYLE, PRETRAIN_WORDING

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "base"  # train.demo_base


@dataclass
class DemoOptions:
    output: str = "demo_out"
    questions: int = 600
    pretrain_questions: int = 47000
    pretrain_levels: tuple[int, ...] = PRETRAIN_LEVELS  # the base learns these levels' gold solutions only
    pretrain_epochs: int = 2
    pretrain_style: str = PRETRAIN_STYLE  # cued | chains | drills (train.data.synthetic._pretrain_records)
    pretrain_wording: str = PRETRAIN_WORDING  # task (the task's sentences) | other (the same operations said otherwise)
    test_questions: int = 1500
    valid_questions: int = 600  # the validation split (its own seed): hyperparameters are chosen on it
    seed: int = 0
    workers: int = 2
    vocab_size: int = 512
    nproc: int = 2  # processes per training stage
    base: str = str(SHIPPED_BASE)  # a pre-trained base installed when it is this demo's (train.demo_base)
    train_base: bool = False  # pre-train the base here even when the shipped one is this demo's
    ablation: bool = False  # then run `tdg ablation` on the demo's data
    ablation_seeds: int = 3
    ablation_steps: int = 0  # > 0: optim.max_steps for every ablation training stage
    ablation_questions: int = 0  # > 0: eval.max_questions for the ablation
