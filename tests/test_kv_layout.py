"""The page allocator's runs and the cut of a push into messages (`shared/kv_layout.py`).

In process, without gloo: each message is copied into where the receiver would receive it (a
cache view, or staging then `KVCache.scatter`), so the mapping is checked bit for bit here and
the transport in tests/test_kv_transfer.py.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from shared.checkpoint import TEXT_CONFIG
from shared.config import ModelConfig
from shared.kv_cache import KVCache, PageAllocator, page_runs
from shared.kv_layout import (
    MIN_DIRECT_TOKENS,
    check_pieces,
    direct_views,
    piece_starts,
    plan_pieces,
    send_messages,
)

PAGE_SIZE = 16
LAYERS, RANK, ROPE = 3, 8, 4
CHUNK = 512  # staged pieces


def small_cache(num_pages: int) -> KVCache:
    base = ModelConfig.from_dict(TEXT_CONFIG).text
    config = dataclasses.replace(base, num_hidden_layers=LAYERS, kv_lora_rank=RANK,
                                 qk_rope_head_dim=ROPE)  # fmt: skip
    return KVCache(config, num_pages, PAGE_SIZE, torch.bfloat16, "cpu")


# ---------------------------------------------------------------- allocator


def test_allocator_hands_out_runs_and_merges_what_is_freed():
    allocator = PageAllocator(100)
    a, b, c = allocator.allocate(10), allocator.allocate(30), allocator.allocate(5)
    assert (a, b, c) == (list(range(10)), list(range(10, 40)), list(range(40, 45)))
    allocator.free(b)
    assert allocator.allocate(20) == list(range(10, 30))  # first fit: the hole b left
    assert allocator.allocate(15) == list(range(45, 60))  # 10 left in the hole: too few
    allocator.free(list(range(10, 30)))
    allocator.free(c)
    allocator.free(a[::-1])  # any order: 0..44 merge back into one run
    assert allocator.allocate(45) == list(range(45))
    assert allocator.num_free == 100 - 45 - 15


def test_allocator_takes_the_lowest_runs_when_none_fits():
    allocator = PageAllocator(12)
    held = [allocator.allocate(1) for _ in range(12)]
    allocator.free(held[1] + held[2] + held[5] + held[9] + held[10] + held[11])
    assert page_runs(allocator.allocate(5)) == [(1, 2), (5, 1), (9, 2)]
    assert allocator.num_free == 1 and allocator.allocate(1) == [11]


def test_allocator_rejects_double_and_duplicate_frees_without_losing_pages():
    allocator = PageAllocator(8)
    pages = allocator.allocate(8)
    allocator.free(pages[2:4])
    for bad in ([3], [1, 1], [2, 6], [8]):
        with pytest.raises(AssertionError):
            allocator.free(bad)
    assert allocator.num_free == 2
    allocator.free(pages[:2] + pages[4:])
    assert allocator.allocate(8) == list(range(8))


def test_allocator_stays_in_few_runs_under_churn():
    """Requests of mixed sizes come and go; most big reservations are one run."""
    rng, allocator, live = random.Random(0), PageAllocator(4096), []
    runs_per_big = []
    for _ in range(3000):
        if live and (rng.random() < 0.5 or not allocator.can_allocate(128)):
            allocator.free(live.pop(rng.randrange(len(live))))
            continue
        pages = allocator.allocate(rng.choice([1, 2, 8, 40, 128]))
        live.append(pages)
        if len(pages) == 128:
            runs_per_big.append(len(page_runs(pages)))
    for pages in live:
        allocator.free(pages)
    assert allocator.allocate(4096) == list(range(4096))
    assert sum(r == 1 for r in runs_per_big) / len(runs_per_big) > 0.9, runs_per_big


# ---------------------------------------------------------------- the cut


def test_plan_follows_runs_and_chunks_the_rest():
    long = MIN_DIRECT_TOKENS // PAGE_SIZE  # pages in the shortest direct run
    assert plan_pieces(40, CHUNK, [7, 8, 9], PAGE_SIZE) == []  # short: whole
    assert plan_pieces(40, CHUNK, None, PAGE_SIZE) == []
    assert plan_pieces(300, CHUNK, list(range(5, 5 + 19)), PAGE_SIZE) == [300]  # one run
    assert plan_pieces(1200, CHUNK, None, 0) == [512, 1024, 1200]  # no table: chunks
    # 3 lone pages, then a run long enough, then 40 lone pages, one of them a last partial one
    pages = [90, 70, 50, *range(100, 100 + long), *range(400, 480, 2)]
    num_tokens = (len(pages) - 1) * PAGE_SIZE + 3
    run_end = (3 + long) * PAGE_SIZE
    assert plan_pieces(num_tokens, CHUNK, pages, PAGE_SIZE) == [
        48, run_end, run_end + 512, num_tokens]  # fmt: skip
    with pytest.raises(ValueError):
        check_pieces([100, 100, 200], 200)
    check_pieces([100, 200], 200)


def deliver(cache: KVCache, pages: list[int], ckv, kpe, pieces: list[int]) -> dict[str, int]:
    """What the receiver does with each message, minus the socket; tokens by path."""
    messages, moved = send_messages(ckv, kpe, pieces), {"direct": 0, "staged": 0}
    if not pieces:
        cache.scatter(pages, messages[0].clone(), messages[1].clone())
        moved["staged"] += ckv.shape[1]
        return moved
    per_piece = 2 * LAYERS
    for index, (start, end) in enumerate(piece_starts(pieces)):
        sent = messages[index * per_piece : (index + 1) * per_piece]
        views = direct_views(cache, pages, start, end)
        if views is None:
            staged = [torch.stack(sent[kind::2]) for kind in (0, 1)]  # [L, T, *]
            cache.scatter(pages[start // PAGE_SIZE :], *staged)
            moved["staged"] += end - start
            continue
        for view, message in zip(views, sent, strict=True):
            assert view.is_contiguous() and view.shape == message.shape
            view.copy_(message)
        moved["direct"] += end - start
    return moved


@pytest.mark.parametrize("layout", ["runs", "fragmented", "mixed", "gathered"])
def test_every_cut_lands_bit_for_bit(layout):
    num_tokens, cache = 1500, small_cache(200)
    pages = list(range(20, 20 + 94))
    if layout == "fragmented":
        pages = pages[::2] + pages[1::2]
    elif layout == "mixed":
        pages = pages[60:] + pages[:3][::-1] + pages[3:60]
    sent_ckv = torch.randn(LAYERS, num_tokens, RANK).to(torch.bfloat16)
    sent_kpe = torch.randn(LAYERS, num_tokens, ROPE).to(torch.bfloat16)
    ckv, kpe = sent_ckv, sent_kpe
    if layout == "gathered":  # a view with a layer stride of its own, as `gather` returns
        source = small_cache(200)
        source.scatter(list(range(100, 194)), sent_ckv, sent_kpe)
        ckv, kpe = source.gather(list(range(100, 194)), num_tokens)
        assert not ckv.is_contiguous()
    pieces = plan_pieces(num_tokens, CHUNK, pages, PAGE_SIZE)

    moved = deliver(cache, pages, ckv, kpe, pieces)

    got_ckv, got_kpe = cache.gather(pages, num_tokens)
    assert torch.equal(got_ckv.view(torch.int16), sent_ckv.view(torch.int16))
    assert torch.equal(got_kpe.view(torch.int16), sent_kpe.view(torch.int16))
    expected_direct = {"runs": 1500, "gathered": 1500, "fragmented": 0, "mixed": 1500 - 3 * 16}
    assert moved == {"direct": expected_direct[layout], "staged": 1500 - expected_direct[layout]}


def test_a_short_request_moves_whole_and_zero_copy_slices_stay_views():
    ckv, kpe = torch.randn(LAYERS, 10, RANK), torch.randn(LAYERS, 10, ROPE)
    assert [m.shape for m in send_messages(ckv, kpe, [])] == [ckv.shape, kpe.shape]
    messages = send_messages(ckv, kpe, [4, 10])
    assert len(messages) == 2 * 2 * LAYERS
    assert messages[0].data_ptr() == ckv[0].data_ptr() and messages[1].shape == (4, ROPE)
    cache = small_cache(8)
    assert direct_views(cache, [3, 4], 0, 20) is not None
    assert direct_views(cache, [3, 5], 0, 20) is None  # not consecutive
    assert direct_views(cache, [3, 4], 8, 20) is None  # starts inside a page
    assert direct_views(cache, [7, 8], 0, 20) is None  # past the cache
    assert direct_views(cache, None, 0, 20) is None  # unknown request
