"""Attention backends over the paged MLA latent cache.

A backend receives absorbed queries and returns latent outputs; the model does the projections.
Contract of `forward(layer, q_lat, q_pe, batch)`:
  - q_lat [T, H, r] (query already multiplied by W_UK), q_pe [T, H, R] (roped),
  - the new tokens' latents are already written into the cache at `batch.slots`,
  - each sequence i attends causally over its first `batch.kv_lens[i]` cached tokens; its
    `batch.q_lens[i]` queries sit at the end of that range,
  - returns o_lat [T, H, r] (to be multiplied by W_UV), in q_lat's dtype.
The PyTorch backend is the CPU path and the test oracle; the FlashInfer backend
(`shared/attention_flashinfer.py`, GPU only) reads the same page layout. `make_attention_backend`
chooses between them.

Shape letters: T tokens, B sequences, H heads, r kv_lora_rank, R rope dims, P pages of the
longest page table, S key positions (`P * page_size` when padded).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Protocol

import torch

from shared.kv_cache import KVCache

logger = logging.getLogger(__name__)


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

    @property
    def is_decode(self) -> bool:
        """One new token per sequence."""
        return all(n == 1 for n in self.q_lens)

    @functools.cached_property
    def padded_page_table(self) -> torch.Tensor:
        """[B, P] page ids, short tables padded with page 0 (masked out by `kv_lens`).

        Built once per batch and shared by every layer."""
        width = max(len(pages) for pages in self.page_tables)
        rows = [pages + [0] * (width - len(pages)) for pages in self.page_tables]
        return torch.tensor(rows, dtype=torch.long, device=self.slots.device)

    @functools.cached_property
    def kv_lens_tensor(self) -> torch.Tensor:
        """[B] `kv_lens` on the batch's device."""
        return torch.tensor(self.kv_lens, dtype=torch.long, device=self.slots.device)


class AttentionBackend(Protocol):
    def forward(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Plain PyTorch MLA attention, softmax in float32.

    Decode batches (one query per sequence) run as one batched attention over the page tables
    padded to the longest; other batches (prefill, chunked prefill) run one sequence at a time,
    where each sequence's queries already make large matrix products, in blocks of
    `QUERY_BLOCK` queries that each stop at their own last key.
    """

    QUERY_BLOCK = 128  # prefill queries per attention block

    def __init__(self, cache: KVCache, softmax_scale: float) -> None:
        self.cache = cache
        self.scale = softmax_scale

    def forward(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        if not batch.q_lens:  # an empty step (an idle expert-parallel rank)
            return torch.empty_like(q_lat)
        if batch.is_decode:
            return self._decode(layer, q_lat, q_pe, batch)
        return self._ragged(layer, q_lat, q_pe, batch)

    def _decode(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        pages = batch.padded_page_table  # [B, P]
        ckv = self.cache.ckv[layer][pages].flatten(1, 2).float()  # [B, S, r]
        kpe = self.cache.kpe[layer][pages].flatten(1, 2).float()  # [B, S, R]
        scores = torch.bmm(q_pe.float(), kpe.transpose(1, 2))  # [B, H, S]
        scores = torch.baddbmm(scores, q_lat.float(), ckv.transpose(1, 2), alpha=self.scale,
                               beta=self.scale)  # fmt: skip
        key_pos = torch.arange(ckv.shape[1], device=ckv.device)
        padding = key_pos[None, :] >= batch.kv_lens_tensor[:, None]  # [B, S]
        scores.masked_fill_(padding[:, None, :], float("-inf"))
        out = torch.bmm(scores.softmax(dim=-1), ckv)  # [B, H, r]
        return out.to(q_lat.dtype)

    def _ragged(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        out = torch.empty_like(q_lat)
        ckv_pages, kpe_pages = self.cache.ckv[layer], self.cache.kpe[layer]
        start = 0
        for q_len, kv_len, pages in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
            index = torch.tensor(pages, dtype=torch.long, device=q_lat.device)
            ckv = ckv_pages.index_select(0, index).flatten(0, 1)[:kv_len].float()  # [S, r]
            kpe = kpe_pages.index_select(0, index).flatten(0, 1)[:kv_len].float()  # [S, R]
            ql = q_lat[start : start + q_len].float().transpose(0, 1)  # [H, Tq, r]
            qp = q_pe[start : start + q_len].float().transpose(0, 1)  # [H, Tq, R]
            # Blocks of queries stop at their last key, which skips most of the masked half.
            for first in range(0, q_len, self.QUERY_BLOCK):
                last = min(first + self.QUERY_BLOCK, q_len)
                num_keys = kv_len - q_len + last
                block = self._causal(ql[:, first:last], qp[:, first:last], ckv[:num_keys],
                                     kpe[:num_keys])  # fmt: skip
                out[start + first : start + last] = block.to(out.dtype)
            start += q_len
        return out

    def _causal(
        self, ql: torch.Tensor, qp: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor
    ) -> torch.Tensor:
        """Queries [H, t, *] that are the last t of the S keys [S, *]; returns [t, H, r]."""
        num_queries, num_keys = ql.shape[1], ckv.shape[0]
        scores = torch.matmul(qp, kpe.t())  # [H, t, S]
        scores = torch.baddbmm(scores, ql, ckv.t().expand(ql.shape[0], -1, -1),
                               alpha=self.scale, beta=self.scale)  # fmt: skip
        if num_queries > 1:
            future = torch.ones(num_queries, num_keys, dtype=torch.bool, device=ql.device)
            future = future.triu(diagonal=num_keys - num_queries + 1)
            scores.masked_fill_(future, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), ckv).transpose(0, 1)  # [t, H, r]


ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")
# FlashInfer's MLA kernels read half-precision caches only, and are built and tested for
# DeepSeek's latent widths (kv_lora_rank 512, rope 64), which Kimi-K2.5 shares.
_FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
_FLASHINFER_WIDTHS = (512, 64)


def make_attention_backend(
    cache: KVCache,
    softmax_scale: float,
    device: str | torch.device,
    choice: str = "auto",
    num_heads: int = 0,
) -> AttentionBackend:
    """The attention backend for a cache on `device`.

    `choice` is "torch", "flashinfer" or "auto". "auto" takes FlashInfer when the device is CUDA,
    the cache is fp16 or bf16 with latent widths (512, 64) and `flashinfer` imports; anything else
    gets the PyTorch backend.
    `flashinfer` is imported only on that CUDA branch: it imports on CPU too, but every kernel
    fails there, so a CPU process must never load it. With `num_heads` (the model's), FlashInfer
    runs one query first (building its kernels); under "auto" a failure there falls back to the
    PyTorch backend. "flashinfer" raises when it cannot run.
    """
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {choice!r}: choose one of {ATTENTION_BACKENDS}")
    if choice == "torch":
        return TorchAttentionBackend(cache, softmax_scale)
    reason = _flashinfer_unusable(cache, torch.device(device))
    if reason and choice == "flashinfer":
        raise ValueError(f"the FlashInfer attention backend cannot run: {reason}")
    if reason:
        logger.info("attention backend: torch (%s)", reason)
        return TorchAttentionBackend(cache, softmax_scale)
    from shared.attention_flashinfer import FlashInferAttentionBackend

    try:
        backend = FlashInferAttentionBackend(cache, softmax_scale)
        if num_heads:
            backend.warm_up(num_heads)
    except Exception:
        if choice == "flashinfer":
            raise
        logger.exception("attention backend: torch (FlashInfer failed its first call)")
        return TorchAttentionBackend(cache, softmax_scale)
    logger.info("attention backend: flashinfer")
    return backend


def _flashinfer_unusable(cache: KVCache, device: torch.device) -> str:
    """Why FlashInfer cannot serve this cache ("" when it can); imports it only on CUDA."""
    if device.type != "cuda":
        return f"device {device.type}"
    if cache.ckv.dtype not in _FLASHINFER_DTYPES:
        return f"cache dtype {cache.ckv.dtype} (FlashInfer needs float16 or bfloat16)"
    widths = (cache.ckv.shape[-1], cache.kpe.shape[-1])
    if widths != _FLASHINFER_WIDTHS:
        return f"latent widths {widths} (FlashInfer's MLA kernels take {_FLASHINFER_WIDTHS})"
    try:
        import flashinfer.mla  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA setup found at import
        return f"flashinfer does not import: {exc}"
    return ""
