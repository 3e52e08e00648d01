"""Attention backends over the paged MLA latent cache.

A backend receives absorbed queries and returns latent outputs; the model does the projections.
Contract of `forward(layer, q_lat, q_pe, batch)`:
  - q_lat [T, H, r] (query already multiplied by W_UK), q_pe [T, H, R] (roped),
  - the new tokens' latents are already written into the cache at `batch.slots`,
  - each sequence i attends causally over its first `batch.kv_lens[i]` cached tokens; its
    `batch.q_lens[i]` queries sit at the end of that range,
  - returns o_lat [T, H, r] (to be multiplied by W_UV), in q_lat's dtype.
The PyTorch backend is the CPU path and the test oracle; a FlashInfer backend on GPU reads the
same page layout.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from shared.kv_cache import KVCache


@dataclasses.dataclass
class ForwardBatch:
    """A ragged batch: several sequences, each with some new tokens, flattened to T tokens."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each new token
    q_lens: list[int]  # new tokens per sequence
    kv_lens: list[int]  # cached tokens per sequence after this step (incl. the new ones)
    page_tables: list[list[int]]
    input_embeds: torch.Tensor | None = None  # [T, D] overrides the embedding lookup


class AttentionBackend(Protocol):
    def forward(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Plain PyTorch MLA attention, one sequence at a time, softmax in float32."""

    def __init__(self, cache: KVCache, softmax_scale: float) -> None:
        self.cache = cache
        self.scale = softmax_scale

    def forward(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        out = torch.empty_like(q_lat)
        ckv_pages, kpe_pages = self.cache.ckv[layer], self.cache.kpe[layer]
        start = 0
        for q_len, kv_len, pages in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
            index = torch.tensor(pages, dtype=torch.long, device=q_lat.device)
            ckv = ckv_pages.index_select(0, index).flatten(0, 1)[:kv_len].float()  # [S, r]
            kpe = kpe_pages.index_select(0, index).flatten(0, 1)[:kv_len].float()  # [S, R]
            ql = q_lat[start : start + q_len].float()  # [Tq, H, r]
            qp = q_pe[start : start + q_len].float()  # [Tq, H, R]
            scores = torch.einsum("thr,sr->hts", ql, ckv) + torch.einsum("thr,sr->hts", qp, kpe)
            scores = scores * self.scale  # [H, Tq, S]
            if q_len > 1:
                query_pos = torch.arange(kv_len - q_len, kv_len, device=q_lat.device)
                key_pos = torch.arange(kv_len, device=q_lat.device)
                scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start : start + q_len] = torch.einsum("hts,sr->thr", probs, ckv).to(out.dtype)
            start += q_len
        return out
