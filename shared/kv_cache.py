"""Paged MLA latent cache and its page allocator.

Only the MLA latent is cached: per token and layer, the normalised `c_kv` (`kv_lora_rank`
values) and the roped `k_pe` (`qk_rope_head_dim` values), in two tensors with the page layout
FlashInfer's MLA kernels read: `ckv [layers, pages, page_size, kv_lora_rank]` and
`kpe [layers, pages, page_size, rope_dim]`. A token's slot is `page * page_size + offset`.
"""

from __future__ import annotations

import bisect
import threading

import torch

from shared.config import TextConfig


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Hands out page ids from a fixed pool; thread-safe.

    Free pages are kept as runs of consecutive ids, in id order. `allocate(n)` takes the first
    run that holds `n` pages (first fit), else whole runs from the lowest id up, so a request's
    pages form few runs of consecutive ids: the KV receiver lands such a run without a copy
    (`shared/kv_layout.py`). Both calls cost O(number of free runs), which stays near the number
    of live requests.

    Invariant: every page is either free or owned by exactly one caller; `free` of a page that
    is already free is a bug and raises.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._starts = [0] if num_pages else []  # first id of each free run, ascending
        self._lengths = [num_pages] if num_pages else []
        self._num_free = num_pages
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > self._num_free:
                raise OutOfPagesError(f"need {n} pages, {self._num_free} free")
            for i, length in enumerate(self._lengths):
                if length >= n:
                    return self._take(i, n)
            pages: list[int] = []
            while len(pages) < n:
                pages += self._take(0, min(self._lengths[0], n - len(pages)))
            return pages

    def _take(self, i: int, n: int) -> list[int]:
        """The first `n` pages of free run `i`."""
        start = self._starts[i]
        if n == self._lengths[i]:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += n
            self._lengths[i] -= n
        self._num_free -= n
        return list(range(start, start + n))

    def free(self, pages: list[int]) -> None:
        runs = page_runs(sorted(pages))
        assert len(set(pages)) == len(pages), f"a page of {sorted(pages)} freed twice"
        with self._lock:
            for start, length in runs:  # all checked before any is returned
                assert start >= 0 and start + length <= self.num_pages, f"page {start} out of range"
                i = bisect.bisect_right(self._starts, start)
                below = i and self._starts[i - 1] + self._lengths[i - 1] > start
                above = i < len(self._starts) and self._starts[i] < start + length
                assert not (below or above), f"a page of {start}..{start + length - 1} freed twice"
            for start, length in runs:
                self._put(start, length)
            self._num_free += len(pages)

    def _put(self, start: int, length: int) -> None:
        """Returns pages [start, start + length), merging with the free runs they touch."""
        i = bisect.bisect_right(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start + length:
            length += self._lengths[i]
            del self._starts[i], self._lengths[i]
        if i and self._starts[i - 1] + self._lengths[i - 1] == start:
            self._lengths[i - 1] += length
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, length)


def page_runs(pages: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each maximal run of consecutive ids in `pages`, in order."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and page == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVCache:
    """The latent cache tensors of one worker."""

    def __init__(
        self, config: TextConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: str
    ) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        layers = config.num_hidden_layers
        self.ckv = torch.zeros(layers, num_pages, page_size, config.kv_lora_rank, dtype=dtype,
                               device=device)  # fmt: skip
        self.kpe = torch.zeros(layers, num_pages, page_size, config.qk_rope_head_dim, dtype=dtype,
                               device=device)  # fmt: skip

    def bytes_per_token(self) -> int:
        per_layer = self.ckv.shape[-1] + self.kpe.shape[-1]
        return self.ckv.shape[0] * per_layer * self.ckv.element_size()

    def write(self, layer: int, slots: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """Stores new tokens' latents at flat `slots` [T]; ckv [T, r], kpe [T, R]."""
        self.ckv[layer].view(-1, ckv.shape[-1]).index_copy_(0, slots, ckv.to(self.ckv.dtype))
        self.kpe[layer].view(-1, kpe.shape[-1]).index_copy_(0, slots, kpe.to(self.kpe.dtype))

    def gather(self, page_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_tokens` latents of a request, all layers: [L, S, r] and [L, S, R]."""
        index = torch.tensor(page_ids, dtype=torch.long, device=self.ckv.device)
        ckv = self.ckv.index_select(1, index).flatten(1, 2)[:, :num_tokens]
        kpe = self.kpe.index_select(1, index).flatten(1, 2)[:, :num_tokens]
        return ckv, kpe

    def scatter(self, page_ids: list[int], ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """Writes all layers' latents [L, S, *] of one request into its pages."""
        if self.ckv.is_cuda:  # one kernel for all pages beats one copy per page on a GPU
            # The KV receiver stages on the host (gloo): upload once, not once per layer.
            ckv, kpe = ckv.to(self.ckv.device), kpe.to(self.kpe.device)
            slots = slots_for(page_ids, 0, ckv.shape[1], self.page_size).to(self.ckv.device)
            for layer in range(ckv.shape[0]):
                self.write(layer, slots, ckv[layer], kpe[layer])
            return
        # On CPU a block copy per page runs ~3x faster than an element-wise index_copy_.
        for i, page in enumerate(page_ids):
            start = i * self.page_size
            end = min(start + self.page_size, ckv.shape[1])
            if start >= end:
                break
            self.ckv[:, page, : end - start].copy_(ckv[:, start:end])
            self.kpe[:, page, : end - start].copy_(kpe[:, start:end])


def slots_for(page_ids: list[int], start: int, end: int, page_size: int) -> torch.Tensor:
    """Flat cache slots of token positions [start, end) of a request with these pages."""
    positions = torch.arange(start, end, dtype=torch.long)
    pages = torch.tensor(page_ids, dtype=torch.long)[positions // page_size]
    return pages * page_size + positions % page_size
