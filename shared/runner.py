"""ModelRunner: one model, its paged latent cache, an attention backend and a page allocator.

Engines (prefill, decode, the single-process reference) describe work as `SeqStep`s; the runner
turns them into one ragged `ForwardBatch`, runs the model and returns each sequence's logits.
"""

from __future__ import annotations

import dataclasses

import torch

from shared.attention import ForwardBatch, make_attention_backend
from shared.kv_cache import KVCache, PageAllocator, pages_needed, slots_for
from shared.model.text import KimiTextModel


@dataclasses.dataclass
class SeqStep:
    """New tokens of one sequence, to run after its first `num_cached` tokens.

    `input_embeds` [len(token_ids), D], when given, replaces the embedding lookup of these tokens
    (image embeddings already spliced in at the placeholder rows)."""

    token_ids: list[int]
    num_cached: int
    page_table: list[int]
    input_embeds: torch.Tensor | None = None


class ModelRunner:
    def __init__(
        self,
        model: KimiTextModel,
        num_pages: int,
        page_size: int,
        device: str = "cpu",
        attention_backend: str = "auto",  # "auto", "torch" or "flashinfer" (make_attention_backend)
    ) -> None:
        self.model = model
        self.page_size = page_size
        self.device = device
        dtype = model.embed_tokens.weight.dtype
        self.cache = KVCache(model.config, num_pages, page_size, dtype, device)
        self.allocator = PageAllocator(num_pages)
        self.backend = make_attention_backend(
            self.cache, model.config.softmax_scale, device, attention_backend,
            model.config.num_attention_heads,
        )  # fmt: skip

    def ensure_pages(self, page_table: list[int], num_tokens: int) -> None:
        """Grows `page_table` in place to hold `num_tokens` tokens (raises when out of pages)."""
        missing = pages_needed(num_tokens, self.page_size) - len(page_table)
        if missing > 0:
            page_table.extend(self.allocator.allocate(missing))

    def build_batch(self, steps: list[SeqStep]) -> ForwardBatch:
        ids = []
        positions = [torch.zeros(0, dtype=torch.long)]  # an empty batch is an idle EP step
        slots = [torch.zeros(0, dtype=torch.long)]
        for step in steps:
            start, end = step.num_cached, step.num_cached + len(step.token_ids)
            ids.extend(step.token_ids)
            positions.append(torch.arange(start, end))
            slots.append(slots_for(step.page_table, start, end, self.page_size))
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions).to(self.device),
            slots=torch.cat(slots).to(self.device),
            q_lens=[len(s.token_ids) for s in steps],
            kv_lens=[s.num_cached + len(s.token_ids) for s in steps],
            page_tables=[s.page_table for s in steps],
            input_embeds=self._input_embeds(steps),
        )

    def _input_embeds(self, steps: list[SeqStep]) -> torch.Tensor | None:
        """[T, D] when any step brings its own embeddings: theirs, token embeddings elsewhere."""
        if all(step.input_embeds is None for step in steps):
            return None
        table = self.model.embed_tokens
        rows = []
        for step in steps:
            if step.input_embeds is None:
                ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)
                with torch.no_grad():
                    rows.append(table(ids))  # [t, D]
                continue
            expected = (len(step.token_ids), table.embedding_dim)
            assert tuple(step.input_embeds.shape) == expected, step.input_embeds.shape
            rows.append(step.input_embeds.to(self.device, table.weight.dtype))
        return torch.cat(rows)  # [T, D]

    def run(self, steps: list[SeqStep], all_logits: bool = False) -> torch.Tensor:
        """Logits [B, V] (last new token of each step) or [T, V] with `all_logits`."""
        return self.model(self.build_batch(steps), self.cache, self.backend, all_logits)
