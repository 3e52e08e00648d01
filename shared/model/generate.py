"""Single-process generation: the reference that the served stack must equal token for token."""

from __future__ import annotations

import torch

from shared.model.text import KimiTextModel
from shared.model.vision import splice_image_embeds
from shared.runner import ModelRunner, SeqStep

_PAGE_SIZE = 16


def _runner_for(model: KimiTextModel, num_tokens: int) -> ModelRunner:
    return ModelRunner(model, num_pages=num_tokens // _PAGE_SIZE + 2, page_size=_PAGE_SIZE)


def reference_logits(
    model: KimiTextModel,
    token_ids: list[int],
    image_embeds: list[torch.Tensor] | None = None,
    placeholder_id: int | None = None,
) -> torch.Tensor:
    """Logits [T, V] (float32) of every position of one prompt, through the paged cache.

    With `image_embeds` (one [N_i, D] per image, in prompt order), the rows of the tokens equal
    to `placeholder_id` (`ModelConfig.media_placeholder_token_id`) take the image embeddings."""
    runner = _runner_for(model, len(token_ids))
    pages: list[int] = []
    runner.ensure_pages(pages, len(token_ids))
    embeds = None
    if image_embeds is not None:
        assert placeholder_id is not None, "image_embeds need the placeholder token id"
        ids = torch.tensor(token_ids, dtype=torch.long)
        with torch.no_grad():
            token_embeds = model.embed_tokens(ids)  # [T, D]
        embeds = splice_image_embeds(token_embeds, token_ids, image_embeds, placeholder_id)
    return runner.run([SeqStep(list(token_ids), 0, pages, embeds)], all_logits=True)


def greedy_generate(
    model: KimiTextModel,
    token_ids: list[int],
    max_new_tokens: int,
    stop_token_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """Prefill then one-token decode steps, argmax each time; stops after a stop token."""
    runner = _runner_for(model, len(token_ids) + max_new_tokens)
    pages: list[int] = []
    runner.ensure_pages(pages, len(token_ids))
    logits = runner.run([SeqStep(list(token_ids), 0, pages)])
    out = [int(logits[0].argmax())]
    while len(out) < max_new_tokens and out[-1] not in stop_token_ids:
        cached = len(token_ids) + len(out) - 1
        runner.ensure_pages(pages, cached + 1)
        logits = runner.run([SeqStep([out[-1]], cached, pages)])
        out.append(int(logits[0].argmax()))
    return out
