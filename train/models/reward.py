"""The ASC ranker: a language model with a scalar head, read at the last real token of a sequence.

transformers' sequence-classification head (`score`, one output) sits on the base model; LoRA
adapts the body, the head trains fully. We read the head at the last attended position
ourselves rather than let transformers find "the last non-pad token": many Llama tokenizers set
pad = eos, and every sequence here ends in EOS, which that search would skip.

A ranker dir holds `adapter/` (PEFT LoRA), `head.safetensors` (the score head) and
`ranker.json` (base model, tokenizer, prompt template, max_len, loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from train.errors import ConfigError

RANKER_JSON = "ranker.json"
HEAD_FILE = "head.safetensors"


class RewardModel(torch.nn.Module):
    """r(sequence) = score_head(hidden state at the last attended token); forward returns [B] floats."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm  # a *ForSequenceClassification model, possibly wrapped by PEFT

    def base(self) -> torch.nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def config(self):
        return self.base().config

    def head(self) -> torch.nn.Module:
        return self.base().score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.base()
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(-1) - 1  # right padding: the last real token of each row
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return base.score(pooled).squeeze(-1).float()


def save_head(head: torch.nn.Module, out: Path, hidden_size: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    w = state.get("weight")
    if w is None or tuple(w.shape) != (1, hidden_size):
        shape = None if w is None else tuple(w.shape)
        raise ConfigError(f"{out / HEAD_FILE}: score head has shape {shape}, expected (1, {hidden_size}); "
                          "parameters not gathered before saving?")
    save_file(state, str(out / HEAD_FILE))


@dataclass
class Ranker:
    """A trained ranker ready to score eval candidates exactly as stage ranker tokenized its training samples."""

    model: RewardModel
    tokenizer: object
    spec: dict  # ranker.json: prompt_template, prompt_format, system_prompt, max_len, ...

    @torch.no_grad()
    def scores(self, question: str, rationales: list[str], finished: list[bool], device: torch.device) -> list[float]:
        """The raw output r for each rationale. `finished[i]` says whether candidate i ended with EOS; one cut by
        the generation limit is scored without it, as training saw samples (with EOS) only if they ended.
        Candidates longer than the ranker's max_len are cut to it; a question whose prompt alone is that long
        gets 0 for every candidate."""
        from train.data.dataset import collate

        data = candidate_samples(self.tokenizer, self.spec, question, rationales, finished)
        if len(data) < len(rationales):
            return [0.0] * len(rationales)
        batch = collate(data, np.arange(len(data)), self.tokenizer.pad_token_id, packing=False)
        return self.model(input_ids=batch["input_ids"].to(device),
                          attention_mask=batch["attention_mask"].to(device)).tolist()


def candidate_samples(tokenizer, spec: dict, question: str, rationales: list[str], finished: list[bool]):
    """Eval candidates as ranker samples: `train.data.dataset.tokenize`, the function stage ranker trained with,
    with its template and max_len; EOS only on finished candidates, overlong ones cut (a vote cannot drop them)."""
    from train.data.dataset import tokenize
    from train.data.prompt import Prompt

    table = pa.table({"id": [str(i) for i in range(len(rationales))], "question": [question] * len(rationales),
                      "rationale": rationales})
    return tokenize(table, tokenizer, spec["max_len"], Prompt.from_record(spec), "truncate", finished=finished)


def read_ranker_spec(ranker_dir: str | Path) -> dict:
    """ranker.json, with the settings of rankers written before they were recorded filled in."""
    from train.data.prompt import DEFAULT_TEMPLATE

    d = Path(ranker_dir)
    if not (d / RANKER_JSON).is_file():
        raise ConfigError(f"eval.ranker: {d} is not a finished stage-ranker output (no {RANKER_JSON})")
    spec = json.loads((d / RANKER_JSON).read_text())
    spec.setdefault("prompt_template", DEFAULT_TEMPLATE)
    spec.setdefault("max_len", 2048)
    return spec


def load_ranker(ranker_dir: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Ranker:
    """The trained ranker (LoRA merged into the body) in eval mode, with its tokenizer and settings."""
    from peft import PeftModel

    from train.config import ModelConfig
    from train.data.tokenizer import load_tokenizer
    from train.models.loading import load_base_model

    d = Path(ranker_dir)
    spec = read_ranker_spec(d)
    base = load_base_model(ModelConfig(path=spec["base_model"]), dtype, scalar_head=True, device=device)
    base.score.load_state_dict(load_file(str(d / HEAD_FILE)))
    model = PeftModel.from_pretrained(base, str(d / "adapter")).merge_and_unload()
    return Ranker(RewardModel(model).to(device).eval(), load_tokenizer(spec["tokenizer"]), spec)
