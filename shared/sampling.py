"""Token sampling: greedy, temperature, top-k, top-p, min-p, penalties, seeds, logprobs, grammars.

A seeded request draws step `i` from a generator seeded with `(seed, i)`, so its tokens depend
only on the seed and the position, not on batching or on which worker samples.

A request with a grammar (`SamplingConfig.grammar`, `shared/grammar.py`) brings its
`GrammarState`: its row's logits are masked after the penalties, before greedy or random
choice. Log-probabilities are always those of the raw logits, as without a grammar.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.grammar import GrammarState


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What the output must follow (`response_format`); compiled by `shared.grammar`."""

    kind: str  # "json_object" | "json_schema"
    schema: str = ""  # the JSON schema as text, for "json_schema"
    reasoning_end_id: int | None = None  # set: free text up to and including this token


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0
    grammar: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties or top logprobs: the argmax of the raw logits."""
        return (
            self.greedy
            and not self.top_logprobs
            and self.repetition_penalty == 1.0
            and not self.presence_penalty
            and not self.frequency_penalty
        )


@dataclasses.dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


def apply_penalties(
    logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], cfg: SamplingConfig
) -> torch.Tensor:
    """Penalised copy of one row of logits [V]."""
    if cfg.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(
            sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device
        )
        values = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(
            values > 0, values / cfg.repetition_penalty, values * cfg.repetition_penalty
        )
    if output_ids and (cfg.presence_penalty or cfg.frequency_penalty):
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).float()
        logits = logits - cfg.frequency_penalty * counts
        logits = logits - cfg.presence_penalty * (counts > 0).float()
    return logits


def sample_one(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    step: int,
    prompt_ids: list[int] = (),
    output_ids: list[int] = (),
    grammar: GrammarState | None = None,
) -> Sampled:
    """Samples from one row of float32 logits [V]; `step` is the index of the output token.
    With `grammar`, only tokens it allows can be chosen (the state is not advanced here)."""
    logprobs = logits.log_softmax(-1)
    logits = apply_penalties(logits, list(prompt_ids), list(output_ids), cfg)
    if grammar is not None:
        logits = grammar.mask(logits)
    if cfg.greedy:
        token = int(logits.argmax())
    else:
        probs = _filtered_probs(logits / cfg.temperature, cfg)
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed((cfg.seed * 1_000_003 + step) % (2**63))
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if cfg.top_logprobs:
        values, ids = logprobs.topk(cfg.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return Sampled(token, float(logprobs[token]), top)


def sample_batch(
    logits: torch.Tensor,
    configs: Sequence[SamplingConfig],
    steps: Sequence[int],
    prompt_ids: Sequence[list[int]],
    output_ids: Sequence[list[int]],
    grammars: Sequence[GrammarState | None] | None = None,
) -> list[Sampled]:
    """Samples one token per row of float32 logits [B, V]; row i gives exactly what
    `sample_one(logits[i], configs[i], steps[i], prompt_ids[i], output_ids[i], grammars[i])`
    gives.

    Plain greedy rows without a grammar share one batched argmax and log-softmax; other rows go
    one by one. A batch without grammars does no grammar work at all."""
    grammars = grammars or [None] * len(configs)
    plain = [cfg.plain_greedy and grammar is None for cfg, grammar in zip(configs, grammars)]
    tokens: list[int] = []
    chosen: list[float] = []
    if any(plain):
        argmax = logits.argmax(dim=-1)  # [B]
        chosen = logits.log_softmax(-1).gather(1, argmax[:, None]).squeeze(1).tolist()
        tokens = argmax.tolist()
    out = []
    for i, cfg in enumerate(configs):
        if plain[i]:
            out.append(Sampled(tokens[i], chosen[i], []))
        else:
            out.append(
                sample_one(logits[i], cfg, steps[i], prompt_ids[i], output_ids[i], grammars[i])
            )
    return out


def _filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.min_p > 0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.max(), 0.0)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > cfg.top_p  # keeps the token that crosses top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()
