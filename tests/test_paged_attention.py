"""Paged MLA attention against an unpaged reference, and the page allocator's accounting."""

from __future__ import annotations

import random

import pytest
import torch

from shared.attention import ForwardBatch, TorchAttentionBackend
from shared.kv_cache import KVCache, OutOfPagesError, PageAllocator, pages_needed, slots_for
from shared.sampling import SamplingConfig, sample_one


class _Cfg:  # the fields KVCache reads
    num_hidden_layers = 2
    kv_lora_rank = 32
    qk_rope_head_dim = 8


def _reference(q_lat, q_pe, ckv, kpe, kv_len, scale):
    """Causal attention for one sequence with its latents laid out contiguously."""
    q_len = q_lat.shape[0]
    scores = (
        torch.einsum("thr,sr->hts", q_lat, ckv) + torch.einsum("thr,sr->hts", q_pe, kpe)
    ) * scale
    causal = torch.ones(q_len, kv_len).tril(diagonal=kv_len - q_len).bool()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hts,sr->thr", scores.softmax(-1), ckv)


@pytest.mark.parametrize("seed", range(5))
def test_paged_equals_unpaged_for_random_page_tables(seed):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    page_size, num_pages, heads = 4, 64, 3
    cache = KVCache(_Cfg, num_pages, page_size, torch.float32, "cpu")
    backend = TorchAttentionBackend(cache, softmax_scale=0.3)
    free = list(range(num_pages))
    rng.shuffle(free)  # pages of a sequence are scattered, not contiguous
    seqs = []
    for _ in range(3):
        kv_len = rng.randint(1, 40)
        q_len = rng.choice([1, kv_len, max(1, kv_len // 2)])
        pages = [free.pop() for _ in range(pages_needed(kv_len, page_size))]
        ckv = torch.randn(kv_len, 32, generator=gen)
        kpe = torch.randn(kv_len, 8, generator=gen)
        cache.write(1, slots_for(pages, 0, kv_len, page_size), ckv, kpe)
        seqs.append((q_len, kv_len, pages, ckv, kpe))
    total_q = sum(s[0] for s in seqs)
    q_lat = torch.randn(total_q, heads, 32, generator=gen)
    q_pe = torch.randn(total_q, heads, 8, generator=gen)
    batch = ForwardBatch(
        input_ids=torch.zeros(total_q, dtype=torch.long),
        positions=torch.zeros(total_q, dtype=torch.long),
        slots=torch.zeros(total_q, dtype=torch.long),
        q_lens=[s[0] for s in seqs],
        kv_lens=[s[1] for s in seqs],
        page_tables=[s[2] for s in seqs],
    )
    out = backend.forward(1, q_lat, q_pe, batch)
    start = 0
    for q_len, kv_len, _, ckv, kpe in seqs:
        ref = _reference(q_lat[start : start + q_len], q_pe[start : start + q_len], ckv, kpe,
                         kv_len, 0.3)  # fmt: skip
        torch.testing.assert_close(out[start : start + q_len], ref, atol=1e-5, rtol=1e-5)
        start += q_len


def test_allocator_never_leaks_and_rejects_double_free():
    allocator = PageAllocator(10)
    a = allocator.allocate(4)
    b = allocator.allocate(6)
    assert allocator.num_free == 0 and not allocator.can_allocate(1)
    with pytest.raises(OutOfPagesError):
        allocator.allocate(1)
    allocator.free(a)
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free(a[:1])
    allocator.free(b)
    assert allocator.num_free == 10
    assert sorted(allocator.allocate(10)) == list(range(10))


def test_cache_gather_returns_what_scatter_wrote():
    cache = KVCache(_Cfg, 16, 4, torch.float32, "cpu")
    ckv, kpe = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
    pages = [7, 2, 11]
    cache.scatter(pages, ckv, kpe)
    got_ckv, got_kpe = cache.gather(pages, 10)
    assert torch.equal(got_ckv, ckv) and torch.equal(got_kpe, kpe)
    assert cache.bytes_per_token() == 2 * (32 + 8) * 4


def test_seeded_sampling_depends_only_on_seed_and_step():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=42)
    first = [sample_one(logits, cfg, step).token_id for step in range(20)]
    again = [sample_one(logits, cfg, step).token_id for step in range(20)]
    assert first == again
    assert len(set(first)) > 1


def test_greedy_and_top_k_one_agree_and_logprobs_are_normalised():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    greedy = sample_one(logits, SamplingConfig(temperature=0.0, top_logprobs=5), 0)
    top1 = sample_one(logits, SamplingConfig(temperature=1.0, top_k=1, seed=3), 0)
    assert greedy.token_id == top1.token_id == int(logits.argmax())
    assert greedy.top_logprobs[0][0] == greedy.token_id
    assert sum(torch.tensor([lp for _, lp in greedy.top_logprobs]).exp()) <= 1.0 + 1e-6
    assert greedy.logprob == pytest.approx(float(logits.log_softmax(-1).max()))
