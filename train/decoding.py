"""Batched decoding that stops computing a sequence once it has ended, with `model.generate`'s results.

`generate` runs every row of a batch until the longest one ends: with 8 samples per question and a
few rationales running to `max_new_tokens`, most of a batch's forward passes are spent on rows that
already emitted EOS. `decode` drops ended rows from the batch (and their KV cache) as they
accumulate, and otherwise makes the calls `generate` makes: the same prefill and position ids, the
same float32 logits, and for sampling the same `torch.multinomial` call on a full-batch probability
tensor (ended rows get a placeholder distribution), so every live row receives the random numbers
it would have received in `generate`. Rows do not interact in a decoder's forward pass, so the
tokens match `generate`'s as long as the device's kernels give a row the same result whatever the
batch size; tests/test_decoding.py checks that on this machine. `decode` applies the caller's sampling
settings only (temperature, top-p, no top-k): a model's generation_config.json (a hub model's repetition
penalty, say) is not applied, as eval's config must say everything its results depend on. A model whose
forward does not take the inputs this needs (some remote-code models) is decoded by `generate` itself,
which reads that file as it always does.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

# Drop ended rows once at most this share of the rows in the cache are still running: each drop copies
# the cache, so dropping at every single EOS would cost more than it saves.
COMPACT_AT = 0.75


def _scores(logits: torch.Tensor, temperature: float | None, top_p: float) -> torch.Tensor:
    """`generate`'s sampling warpers in its order: temperature, then nucleus (top-p)."""
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


def generate_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
                    sample: bool = False, temperature: float | None = None, top_p: float = 1.0) -> torch.Tensor:
    """The same rows from `model.generate` (top-k off: the model's generation config cannot add it)."""
    how = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else
           dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None))
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                          eos_token_id=eos_id, use_cache=True, **how)[:, ids.shape[1]:]


def takes_decode_inputs(model) -> bool:
    return {"position_ids", "cache", "logits_to_keep"} <= inspect.signature(model.forward).parameters.keys()


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
           sample: bool = False, temperature: float | None = None, top_p: float = 1.0,
           compact_at: float = COMPACT_AT) -> torch.Tensor:
    """New tokens of each left-padded prompt row, (rows, steps) with `pad_id` after EOS and steps the longest
    generation: what `model.generate(..., use_cache=True)[:, width:]` returns, greedy or sampled (the caller
    seeds torch's generator)."""
    if not takes_decode_inputs(model):
        return generate_tokens(model, ids, mask, max_new_tokens, eos_id, pad_id, sample, temperature, top_p)
    rows, device = ids.shape[0], ids.device
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    live = torch.arange(rows, device=device)  # batch rows whose state is in the cache, in cache order
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    last = positions[:, -1]
    steps = 0
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].to(dtype=torch.float32)
        if sample:
            probs = torch.zeros(rows, logits.shape[-1], dtype=torch.float32, device=device)
            probs[:, pad_id] = 1.0  # placeholder for dropped rows: their draw is discarded
            probs[live] = _scores(logits, temperature, top_p).softmax(dim=-1)
            chosen = torch.multinomial(probs, num_samples=1).squeeze(1)[live]
        else:
            chosen = logits.argmax(dim=-1)
        running = ~ended[live]
        tokens[live[running], step] = chosen[running]
        ended[live[running & (chosen == eos_id)]] = True
        steps = step + 1
        running = ~ended[live]
        if not running.any() or steps == max_new_tokens:
            break
        if running.sum() <= compact_at * len(live):
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, mask, last, chosen = live[keep], mask[keep], last[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        last = last + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                    use_cache=True, logits_to_keep=1)
    return tokens[:, :steps]
