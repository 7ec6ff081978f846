"""Rationales from a trained model: load any stage output as a generator, sample in batches.

Prompts are built by `train.data.dataset.prompt_ids` with the model's prompt (template, format,
system prompt), the function and prompt the training stages used, so a model is asked exactly the way it was
trained. Prompts are left-padded and decoded by `train.decoding.decode`: `generate`'s tokens, without the
forward passes of rows that have ended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from train.config import ModelConfig
from train.errors import ConfigError


def check_generator(path: str | Path, key: str = "eval.model") -> None:
    """Refuse, before anything is created or loaded, a generator (`key`: eval.model, sample.model) that is
    missing or makes no text. A missing name may be a served model: the message says how to reach a server."""
    from train.manifest import read_done
    from train.models.nat import NAT_JSON

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist here; for a model served by an OpenAI-compatible server pass "
                          "--base-url URL (or --backend openai)")
    stage = (read_done(p) or {}).get("stage")
    if stage in ("prepare", "score", "ranker", "eval"):
        raise ConfigError(f"{key}: {p} is the output of stage {stage}, which makes no text; give a model dir, "
                          "an export, or the output of stage sft, neg, nat or distill")
    if not any((p / f).is_file() for f in ("config.json", "model/config.json", "adapter/adapter_config.json",
                                            NAT_JSON)):
        raise ConfigError(f"{key}: {p} is neither a model dir (config.json) nor a stage output with model/, "
                          "adapter/ or nat.json")


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
        check_generator(p)
        raise AssertionError(p)  # check_generator names what is wrong
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
    failed: list[str] = field(default_factory=list)  # per question, from a server: why it has no answer ("" if ok)
    greedy_finished: list[bool] = field(default_factory=list)  # per question: the greedy rationale ended (EOS)


KV_FRACTION = 0.5  # share of the free memory eval's KV cache may take


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token of one sequence holds: K and V of every layer (grouped-query aware)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the driver's free GPU memory, or on CPU the available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def kv_budget_tokens(free_bytes: float, per_token: int, fraction: float = KV_FRACTION) -> int:
    """Tokens of KV cache that `fraction` of `free_bytes` holds: one rule for eval's runtime budget and
    `tdg plan`'s (the other half is left for generate's activations and the allocator)."""
    return max(1, int(max(0.0, free_bytes) * fraction) // per_token)


def generation_budget(max_batch_tokens: int, config, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens (prompt + new, over every sequence in flight) one generate call may hold: `eval.max_batch_tokens`,
    or when 0 what the device's free memory holds. Call it once every model of the run is loaded (eval loads
    its ranker first): a budget taken before the ranker loads would count the ranker's memory twice."""
    if max_batch_tokens > 0:
        return max_batch_tokens
    return kv_budget_tokens(free_memory(device), kv_cache_bytes_per_token(config, dtype))


def rows_per_call(budget_tokens: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """Sequences one generate call holds within the budget (at least one)."""
    return max(1, budget_tokens // (prompt_tokens + max_new_tokens))


@torch.no_grad()
def generate_rationales(model, tok, questions: list[str], prompt, n: int, temperature: float, top_p: float,
                        max_new_tokens: int, seed: int, device: torch.device,
                        budget_tokens: int = 1 << 62, greedy: bool = True) -> Generated:
    """One greedy rationale and n sampled ones per question, prompted through `prompt` (a Prompt), in as many decode
    calls as the KV-cache budget needs: the greedy rows and the question x n sampled rows are each cut into
    chunks of `rows_per_call` sequences (greedy results do not depend on the chunking)."""
    from train.data.dataset import prompt_ids
    from train.decoding import decode

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(prompt_ids(tok, questions, prompt), pad)
    ids, mask = ids.to(device), mask.to(device)
    width = ids.shape[1]
    rows = rows_per_call(budget_tokens, width, max_new_tokens)

    def chunked(row_ids: torch.Tensor, row_mask: torch.Tensor, **kw) -> torch.Tensor:
        outs = [decode(model, row_ids[i:i + rows], row_mask[i:i + rows], max_new_tokens, tok.eos_token_id, pad, **kw)
                for i in range(0, len(row_ids), rows)]
        longest = max(o.shape[1] for o in outs)  # calls stop at their own longest generation
        return torch.cat([F.pad(o, (0, longest - o.shape[1]), value=pad) for o in outs])

    greedy_text, greedy_ended = [""] * len(questions), [True] * len(questions)  # greedy=False: tdg sample
    if greedy:
        greedy_ids = chunked(ids, mask)
        greedy_text = tok.batch_decode(greedy_ids, skip_special_tokens=True)
        greedy_ended = (greedy_ids == tok.eos_token_id).any(-1).tolist()
    if n == 0:  # greedy only (eval.n=0)
        return Generated(greedy_text, [[] for _ in questions], [[] for _ in questions], greedy_finished=greedy_ended)
    torch.manual_seed(seed)
    sampled = chunked(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), sample=True,
                      temperature=temperature, top_p=top_p)
    sampled_text = tok.batch_decode(sampled, skip_special_tokens=True)
    ended = (sampled == tok.eos_token_id).any(-1).tolist()
    return Generated(greedy_text, [sampled_text[i * n:(i + 1) * n] for i in range(len(questions))],
                     [ended[i * n:(i + 1) * n] for i in range(len(questions))], greedy_finished=greedy_ended)
