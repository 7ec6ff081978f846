"""`decode` gives `model.generate`'s tokens while computing only the rows that have not ended."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.decoding import decode, generate_tokens, takes_decode_inputs
from train.generation import left_pad

PAD = 0


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def prompts(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 3-12 tokens, and one row as long as the longest so some rows are unpadded."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(3, 12, (rows,), generator=g)]
    lengths[0] = 12
    return left_pad([torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths], PAD)


def common_tokens(reference: torch.Tensor, count: int) -> list[int]:
    """The tokens generated most often: as EOS they end rows at many different steps, in different orders."""
    return torch.bincount(reference[reference != PAD].flatten()).argsort(descending=True)[:count].tolist()


def count_rows(model) -> list[int]:
    """Batch size of every forward pass of `model` from now on."""
    rows: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", [{}, {"sample": True, "temperature": 0.7}, {"sample": True, "temperature": 1.3,
                                                                           "top_p": 0.8}],
                         ids=["greedy", "sampled", "sampled-top-p"])
@pytest.mark.parametrize("compact_at", [0.75, 1.0])
def test_decode_gives_generates_tokens(dtype, how, compact_at):
    """Every row equals generate's, for EOS tokens that end rows early, late, padded rows first or last, and for
    cache compaction at every ended row (1.0) or in steps (0.75); sampled rows receive generate's random draws."""
    model = tiny_llama(dtype)
    ids, mask = prompts(6, seed=1)
    if how:
        ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    torch.manual_seed(3)
    unended = generate_tokens(model, ids, mask, 24, eos_id=63, pad_id=PAD, **how)
    for eos in common_tokens(unended, 6):
        torch.manual_seed(3)
        want = generate_tokens(model, ids, mask, 24, eos, PAD, **how)
        torch.manual_seed(3)
        got = decode(model, ids, mask, 24, eos, PAD, compact_at=compact_at, **how)
        assert torch.equal(got, want), f"eos {eos}: rows {(got != want).any(-1).nonzero().flatten().tolist()} differ"


def test_decode_stops_computing_rows_that_ended():
    model = tiny_llama(torch.float32)
    ids, mask = prompts(16, seed=2)
    eos = common_tokens(generate_tokens(model, ids, mask, 40, eos_id=63, pad_id=PAD), 1)[0]
    rows = count_rows(model)
    out = generate_tokens(model, ids, mask, 40, eos, PAD)
    generate_rows = sum(rows)
    rows.clear()
    assert torch.equal(decode(model, ids, mask, 40, eos, PAD), out)
    ended_at = torch.where((out == eos).any(-1), (out == eos).int().argmax(-1) + 1, out.shape[1])
    assert generate_rows == 16 * out.shape[1]
    assert ended_at.float().mean() < 0.8 * out.shape[1], "the test needs rows that end early"
    # a row is computed until it ends, or until a quarter of the rows in the cache have ended with it
    assert sum(rows) < generate_rows
    assert sum(rows) <= ended_at.sum() / 0.75 + 16


def test_a_model_without_decode_inputs_is_decoded_by_generate():
    class OldForward(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    torch.manual_seed(0)
    model = OldForward(tiny_llama(torch.float32).config).eval()
    assert takes_decode_inputs(tiny_llama(torch.float32)) and not takes_decode_inputs(model)
    ids, mask = prompts(4, seed=3)
    assert torch.equal(decode(model, ids, mask, 10, 5, PAD), generate_tokens(model, ids, mask, 10, 5, PAD))
