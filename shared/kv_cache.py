"""Paged MLA latent cache and its page allocator.

Only the MLA latent is cached: per token and layer, the normalised `c_kv` (`kv_lora_rank`
values) and the roped `k_pe` (`qk_rope_head_dim` values), in two tensors with the page layout
FlashInfer's MLA kernels read: `ckv [layers, pages, page_size, kv_lora_rank]` and
`kpe [layers, pages, page_size, rope_dim]`. A token's slot is `page * page_size + offset`.
"""

from __future__ import annotations

import threading

import torch

from shared.config import TextConfig


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Hands out page ids from a fixed pool; thread-safe.

    Invariant: every page is either free or owned by exactly one caller; `free` of a page that
    is already free is a bug and raises.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._free_set = set(self._free)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
            pages = [self._free.pop() for _ in range(n)]
            self._free_set.difference_update(pages)
            return pages

    def free(self, pages: list[int]) -> None:
        with self._lock:
            for page in pages:
                assert 0 <= page < self.num_pages, f"page {page} out of range"
                assert page not in self._free_set, f"page {page} freed twice"
                self._free.append(page)
                self._free_set.add(page)


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
