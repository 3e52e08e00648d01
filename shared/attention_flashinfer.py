"""FlashInfer's paged MLA attention as an `AttentionBackend` (CUDA only; see shared/attention.py).

Only `shared.attention.make_attention_backend` imports this module, and only for a CUDA cache:
`import flashinfer` succeeds on a CPU machine, but every kernel fails there.

Written against `flashinfer-python` 0.7.4 (`flashinfer/mla/_batch_mla/_wrapper.py`, the wheel's
own source) and the 2025 source of `flashinfer/mla.py` and `tests/attention/test_deepseek_mla.py`
(flashinfer-ai/flashinfer on GitHub). What this code relies on, true in both:
  - `BatchMLAPagedAttentionWrapper(workspace, backend="auto")`; on an H200 (SM90) "auto" tries
    the fa3 kernels, then fa2.
  - `plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads, head_dim_ckv, head_dim_kpe,
    page_size, causal, sm_scale, q_data_type, kv_data_type)`, passed by keyword (0.7 deprecates
    positional arguments and this flat form, with a DeprecationWarning, but still accepts it).
    The four metadata tensors are int32; they may live on the CPU (the plan needs them there).
    `kv_indptr` counts pages, `kv_len_arr` tokens per request.
  - `run(q_nope=[T, H, 512], q_pe=[T, H, 64], ckv_cache=[pages, page_size, 512],
    kpe_cache=[pages, page_size, 64])` -> [T, H, 512] in q's dtype. q and the cache are fp16 or
    bf16 (fp8 cache on SM90 only); the output dtype is q's.
  - `sm_scale` multiplies the whole logit `q_nope . ckv + q_pe . kpe`, so it is the model's
    softmax scale (1/sqrt(qk_nope + qk_rope) before absorption, times YaRN's mscale^2): the same
    number the PyTorch backend uses.
  - With `causal=True` a request's queries are its last `q_len` positions of `kv_len`
    (bottom-right alignment), our backend contract.

Our `KVCache` keeps `ckv [layers, pages, page_size, r]` and `kpe [layers, pages, page_size, R]`,
so `cache.ckv[layer]` and `cache.kpe[layer]` are the contiguous tensors `run` reads: no copy per
step or layer.
"""

from __future__ import annotations

import torch

from shared.attention import ForwardBatch
from shared.kv_cache import KVCache, pages_needed

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended float workspace (split-k partials)


class FlashInferAttentionBackend:
    """Paged MLA attention through one `BatchMLAPagedAttentionWrapper`.

    The plan (page metadata, work split) depends only on the batch, so it runs once per forward:
    on the first layer of each new `ForwardBatch` (the model builds one per forward and passes
    the same object to every layer); the other layers only `run`. Not thread-safe: one forward
    at a time per backend, as one engine thread drives one runner.
    """

    def __init__(self, cache: KVCache, softmax_scale: float) -> None:
        import flashinfer.mla  # CUDA only: see the module docstring

        self.cache = cache
        self.scale = softmax_scale
        device = cache.ckv.device
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        self._planned: ForwardBatch | None = None  # kept alive so its identity cannot be reused
        self.num_plans = 0

    def forward(
        self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        if not batch.q_lens:  # an empty step (an idle expert-parallel rank)
            return torch.empty_like(q_lat)
        if self._planned is not batch:
            self.plan(batch, q_lat.shape[1], q_lat.dtype)
        return self.wrapper.run(
            q_nope=q_lat.contiguous(),  # [T, H, r]
            q_pe=q_pe.contiguous(),  # [T, H, R]
            ckv_cache=self.cache.ckv[layer],  # [pages, page_size, r]
            kpe_cache=self.cache.kpe[layer],  # [pages, page_size, R]
        )

    def warm_up(self, num_heads: int) -> None:
        """Plans and runs one query over page 0 (reads only), so a kernel that fails to build or
        launch (FlashInfer compiles its kernels on first use) fails here, at start-up."""
        device, dtype = self.cache.ckv.device, self.cache.ckv.dtype
        zeros = torch.zeros(1, dtype=torch.long, device=device)
        batch = ForwardBatch(zeros, zeros, zeros, q_lens=[1], kv_lens=[1], page_tables=[[0]])
        q_lat = torch.zeros(1, num_heads, self.cache.ckv.shape[-1], dtype=dtype, device=device)
        q_pe = torch.zeros(1, num_heads, self.cache.kpe.shape[-1], dtype=dtype, device=device)
        self.forward(0, q_lat, q_pe, batch)
        torch.cuda.synchronize(device)

    def plan(self, batch: ForwardBatch, num_heads: int, q_dtype: torch.dtype) -> None:
        """Prepares the kernels for `batch`; `forward` calls it on a batch's first layer."""
        qo_indptr, kv_indptr, kv_indices, kv_lens = plan_metadata(batch, self.cache.page_size)
        self.wrapper.plan(
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            kv_len_arr=kv_lens,
            num_heads=num_heads,
            head_dim_ckv=self.cache.ckv.shape[-1],
            head_dim_kpe=self.cache.kpe.shape[-1],
            page_size=self.cache.page_size,
            causal=not batch.is_decode,  # one query per sequence needs no mask
            sm_scale=self.scale,
            q_data_type=q_dtype,
            kv_data_type=self.cache.ckv.dtype,
        )
        self._planned = batch
        self.num_plans += 1


def plan_metadata(
    batch: ForwardBatch, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page metadata of a batch, int32 on the CPU.

    Returns qo_indptr [B+1] (query offsets), kv_indptr [B+1] (page offsets), kv_indices [pages]
    and kv_lens [B]. Each page table is cut to the pages its `kv_len` tokens fill, so a table
    reserved ahead (pages not written yet) never reaches the kernel.
    """
    used = [
        pages[: pages_needed(kv_len, page_size)]
        for pages, kv_len in zip(batch.page_tables, batch.kv_lens)
    ]
    qo_indptr = _offsets(batch.q_lens)
    kv_indptr = _offsets([len(pages) for pages in used])
    kv_indices = torch.tensor([p for pages in used for p in pages], dtype=torch.int32)
    kv_lens = torch.tensor(batch.kv_lens, dtype=torch.int32)
    return qo_indptr, kv_indptr, kv_indices, kv_lens


def _offsets(counts: list[int]) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    return out
