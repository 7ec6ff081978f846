import numpy as np
import pytest
import torch

from train.data.batching import TokenBudgetBatcher, global_max_pad_fraction, pad_fraction
from train.data.dataset import IGNORE, TokenizedSet, collate


def _lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(20, 400, size=n)


@pytest.mark.parametrize("packing", [False, True])
def test_deterministic_per_seed_and_epoch(packing):
    lens = _lengths()
    a = TokenBudgetBatcher(lens, 2048, seed=3, packing=packing)
    b = TokenBudgetBatcher(lens, 2048, seed=3, packing=packing)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches(0), b.batches(0), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches(0), a.batches(1), strict=False))
    c = TokenBudgetBatcher(lens, 2048, seed=4, packing=packing)
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches(0), c.batches(0), strict=False))


@pytest.mark.parametrize("packing", [False, True])
def test_budget_respected_and_every_sample_once(packing):
    lens = _lengths()
    batcher = TokenBudgetBatcher(lens, 2048, seed=0, packing=packing)
    for epoch in range(3):
        batches = batcher.batches(epoch)
        seen = np.sort(np.concatenate(batches))
        assert np.array_equal(seen, np.arange(len(lens)))
        for b in batches:
            cost = lens[b].sum() if packing else len(b) * lens[b].max()
            assert cost <= 2048


def test_length_grouping_beats_global_padding():
    lens = _lengths(5000)
    batcher = TokenBudgetBatcher(lens, 4096, seed=0)
    grouped = pad_fraction(batcher.batches(0), lens, packing=False)
    assert grouped < global_max_pad_fraction(lens) / 4
    assert pad_fraction(TokenBudgetBatcher(lens, 4096, packing=True).batches(0), lens, packing=True) == 0.0


def test_sample_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatcher([10, 600], 512)


def test_resume_position_maps_back_to_the_same_batch():
    batcher = TokenBudgetBatcher(_lengths(), 2048, seed=1)
    for k in (0, 1, 7, len(batcher.batches(2)) - 1):
        consumed = batcher.samples_before(2, k)
        assert batcher.batch_index_at(2, consumed) == k
    with pytest.raises(ValueError, match="batch boundary"):
        batcher.batch_index_at(2, batcher.samples_before(2, 3) + 1)


def test_ranks_split_each_step_and_world_size_does_not_change_batches():
    batcher = TokenBudgetBatcher(_lengths(), 2048, seed=2)
    steps = batcher.steps_in_epoch(0, world=2, accum=2)
    covered = []
    for step in range(steps):
        r0 = batcher.step_batches(0, step, world=2, rank=0, accum=2)
        r1 = batcher.step_batches(0, step, world=2, rank=1, accum=2)
        covered += [*r0, *r1]
    flat = np.concatenate(covered)
    assert len(flat) == len(set(flat.tolist()))  # no sample twice
    # The same samples in the same order as a single rank walking the batch list.
    single = np.concatenate(batcher.batches(0)[: steps * 4])
    assert set(flat.tolist()) == set(single.tolist())


def test_collate_masks_prompt_and_padding():
    seqs = [np.array([1, 5, 6, 7, 2], np.int32), np.array([1, 8, 9, 2], np.int32)]
    data = TokenizedSet(["a", "b"], seqs, np.array([2, 3]), 0)
    padded = collate(data, [0, 1], pad_id=0, packing=False)
    assert padded["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]
    assert padded["labels"].tolist() == [[IGNORE, IGNORE, 6, 7, 2], [IGNORE, IGNORE, IGNORE, 2, IGNORE]]
    packed = collate(data, [0, 1], pad_id=0, packing=True)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert packed["labels"].tolist() == [[IGNORE, IGNORE, 6, 7, 2, IGNORE, IGNORE, IGNORE, 2]]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_gives_the_same_logits_as_separate_samples(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=impl)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 64, size=n).astype(np.int32) for n in (7, 12, 5)]
    data = TokenizedSet(["a", "b", "c"], seqs, np.array([2, 3, 1]), 0)
    packed, padded = collate(data, [0, 1, 2], 0, packing=True), collate(data, [0, 1, 2], 0, packing=False)
    with torch.no_grad():
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        ld = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    offset = 0
    for row, s in enumerate(seqs):
        torch.testing.assert_close(lp[offset:offset + len(s)], ld[row, : len(s)], atol=1e-5, rtol=1e-5)
        offset += len(s)
