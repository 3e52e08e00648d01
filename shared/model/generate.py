"""Single-process generation: the reference that the served stack must equal token for token."""

from __future__ import annotations

import torch

from shared.model.text import KimiTextModel
from shared.runner import ModelRunner, SeqStep

_PAGE_SIZE = 16


def _runner_for(model: KimiTextModel, num_tokens: int) -> ModelRunner:
    return ModelRunner(model, num_pages=num_tokens // _PAGE_SIZE + 2, page_size=_PAGE_SIZE)


def reference_logits(model: KimiTextModel, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, V] (float32) of every position of one prompt, through the paged cache."""
    runner = _runner_for(model, len(token_ids))
    pages: list[int] = []
    runner.ensure_pages(pages, len(token_ids))
    return runner.run([SeqStep(list(token_ids), 0, pages)], all_logits=True)


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
