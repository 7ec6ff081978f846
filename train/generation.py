"""Rationales from a trained model: load any stage output as a generator, sample in batches.

Prompts are built by `train.data.dataset.prompt_ids` with the model's prompt template, the
function and template the training stages used, so a model is asked exactly the way it was
trained. Prompts are left-padded for `generate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from train.config import ModelConfig
from train.errors import ConfigError


def load_generator(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, object, str]:
    """(model in eval mode, tokenizer, what was loaded) from an exported model dir, a full fine-tune
    (`model/`), a LoRA stage output (`adapter/`, merged into its base) or a NAT teacher (`nat.json`).
    Weights are loaded straight onto `device` and LoRA is merged there: no whole copy in host memory."""
    from train.data.tokenizer import load_tokenizer
    from train.models.loading import load_base_model
    from train.models.nat import NAT_JSON, load_nat_teacher

    p = Path(path)

    def plain(model_dir: Path) -> torch.nn.Module:
        return load_base_model(ModelConfig(path=str(model_dir), attn_implementation=attn_implementation), dtype,
                               device=device)

    if (p / "config.json").is_file():
        model, tok, what = plain(p), load_tokenizer(p), f"model dir {p}"
    elif (p / "model" / "config.json").is_file():
        model, tok, what = plain(p / "model"), load_tokenizer(p / "model"), f"full fine-tune {p}/model"
    elif (p / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        base_dir = json.loads((p / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        tok_dir = base_dir
        if (p / "config.yaml").is_file():  # the stage's own tokenizer setting, if it had one
            tok_dir = yaml.safe_load((p / "config.yaml").read_text()).get("model", {}).get("tokenizer") or base_dir
        model = PeftModel.from_pretrained(plain(Path(base_dir)), str(p / "adapter")).merge_and_unload()
        tok, what = load_tokenizer(tok_dir), f"{base_dir} + LoRA {p}/adapter (merged)"
    elif (p / NAT_JSON).is_file():
        model = load_nat_teacher(p, "nat", dtype=dtype, device=device)
        tok = load_tokenizer(json.loads((p / NAT_JSON).read_text())["base_model"])
        what = f"NAT teacher {p} (neg + pos + gate)"
    else:
        raise ConfigError(f"eval.model: {p} is neither a model dir (config.json) nor a stage output with model/, "
                          "adapter/ or nat.json")
    return model.to(device).eval(), tok, what


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, x in enumerate(prompts):
        ids[row, longest - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[row, longest - len(x):] = 1
    return ids, mask


@dataclass
class Generated:
    greedy: list[str]  # one per question
    samples: list[list[str]]  # n per question
    finished: list[list[bool]]  # per sample: it ended with EOS (False: cut by max_new_tokens)


@torch.no_grad()
def generate_rationales(model, tok, questions: list[str], template: str, n: int, temperature: float, top_p: float,
                        max_new_tokens: int, seed: int, device: torch.device) -> Generated:
    """One greedy rationale and n sampled ones per question, prompted through `template`."""
    from train.data.dataset import prompt_ids

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(prompt_ids(tok, questions, template), pad)
    ids, mask = ids.to(device), mask.to(device)
    common = {"attention_mask": mask, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
              "eos_token_id": tok.eos_token_id, "use_cache": True}
    greedy = model.generate(ids, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, **common)
    torch.manual_seed(seed)
    sampled = model.generate(ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             num_return_sequences=n, **common)
    width = ids.shape[1]
    greedy_text = tok.batch_decode(greedy[:, width:], skip_special_tokens=True)
    sampled_text = tok.batch_decode(sampled[:, width:], skip_special_tokens=True)
    ended = (sampled[:, width:] == tok.eos_token_id).any(-1).tolist()
    return Generated(greedy_text, [sampled_text[i * n:(i + 1) * n] for i in range(len(questions))],
                     [ended[i * n:(i + 1) * n] for i in range(len(questions))])
