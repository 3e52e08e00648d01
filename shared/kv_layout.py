"""How one push's KV is cut into messages, and where each message lands on the decode side.

The prefill side holds a request's latents as ckv [L, S, r] and kpe [L, S, R]. A push moves them
either whole, as two messages (ckv, then kpe: a short request), or in pieces: token ranges that
start on a page boundary, each sent as 2 x L messages (per layer, `ckv[layer, a:b]` then
`kpe[layer, a:b]`), slices the sender need not copy. The piece ends travel in `KVPushMsg.pieces`
(empty: whole), so both sides cut alike without sharing any threshold.

The sender cuts along the decode worker's page table: each run of consecutive page ids of at
least `MIN_DIRECT_TOKENS` tokens is a piece of its own, which the receiver lands straight in its
cache (`cache.ckv[layer, p:p+n]` is one contiguous block), so those bytes are never copied on the
decode side. The tokens between such runs go in pieces of at most one chunk, which the receiver
stages and scatters page by page. The receiver lands any piece directly whose pages are
consecutive in its own table, and stages the rest, so a sender that knows no page table (or a
stale one) still moves the KV intact.
"""

from __future__ import annotations

import torch

from shared.kv_cache import KVCache, page_runs, pages_needed

# A shorter run joins the staged chunks: landing it directly saves a copy of its bytes but costs
# 2 x L more messages (about 40 us each for the kpe slices under gloo).
MIN_DIRECT_TOKENS = 256


def _ends(start: int, end: int, step: int) -> list[int]:
    """Ends of [start, end) cut every `step` tokens."""
    return [*range(start + step, end, step), end] if end > start else []


def plan_pieces(num_tokens: int, chunk: int, pages: list[int] | None, page_size: int) -> list[int]:
    """Token ends of a push's pieces; [] moves the KV whole (two messages).

    `chunk` bounds a staged piece (the receiver's staging buffer); `pages` is the decode worker's
    page table for the request (None: unknown, every piece staged but for luck).
    """
    if pages and page_size:
        chunk = max(page_size, chunk // page_size * page_size)  # staged pieces stay page-aligned
        ends, staged_from = [], 0
        for index, length in _runs_by_index(pages[: pages_needed(num_tokens, page_size)]):
            start, end = index * page_size, min((index + length) * page_size, num_tokens)
            if end - start >= MIN_DIRECT_TOKENS:
                ends += _ends(staged_from, start, chunk) + [end]
                staged_from = end
        ends += _ends(staged_from, num_tokens, chunk)
    else:
        ends, staged_from = _ends(0, num_tokens, chunk), 0
    # With nothing to land directly, a request of one chunk moves in 2 messages rather than 2 x L.
    return [] if staged_from == 0 and num_tokens <= chunk else ends


def _runs_by_index(pages: list[int]) -> list[tuple[int, int]]:
    """(index in `pages`, length) of each run of consecutive page ids."""
    out, index = [], 0
    for _, length in page_runs(pages):
        out.append((index, length))
        index += length
    return out


def piece_starts(pieces: list[int]) -> list[tuple[int, int]]:
    return list(zip([0, *pieces[:-1]], pieces))


def check_pieces(pieces: list[int], num_tokens: int) -> None:
    """Raises ValueError unless `pieces` cut [0, num_tokens) into non-empty ranges."""
    if pieces and (pieces[-1] != num_tokens or any(b <= a for a, b in piece_starts(pieces))):
        raise ValueError(f"bad piece ends {pieces[:8]}... for {num_tokens} tokens")


def send_messages(ckv: torch.Tensor, kpe: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    """The tensors of one push in tag order; ckv [L, S, r] and kpe [L, S, R] on the host."""
    if not pieces:
        return [ckv.contiguous(), kpe.contiguous()]
    # Per-layer token slices are contiguous when each layer's rows are: no copy (a view with a
    # layer stride of its own, as `KVCache.gather` returns, qualifies).
    ckv, kpe = (t if t.stride()[1:] == (t.shape[2], 1) else t.contiguous() for t in (ckv, kpe))
    return [t[layer, a:b] for a, b in piece_starts(pieces) for layer in range(ckv.shape[0])
            for t in (ckv, kpe)]  # fmt: skip


def direct_views(cache: KVCache, pages: list[int] | None, start: int, end: int):
    """The 2 x L tensors inside `cache` that receive piece [start, end) of a request with these
    pages, in tag order; None when the piece cannot land directly (its pages are not consecutive
    ids, it starts inside a page, or the cache is not in host memory, where gloo writes)."""
    size = cache.page_size
    if pages is None or start % size or cache.ckv.device.type != "cpu":
        return None
    ids = pages[start // size : pages_needed(end, size)]
    first, count = (ids[0], len(ids)) if ids else (0, 0)
    if count != pages_needed(end, size) - start // size or ids != list(range(first, first + count)):
        return None
    if first < 0 or first + count > cache.num_pages:
        return None
    views = []
    for layer in range(cache.ckv.shape[0]):
        for table in (cache.ckv, cache.kpe):
            block = table[layer, first : first + count]  # [count, page_size, width]
            if not block.is_contiguous():
                return None
            views.append(block.view(-1, table.shape[-1])[: end - start])
    return views
