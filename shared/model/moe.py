"""Mixture-of-experts block: sigmoid `noaux_tc` gate with correction bias, routed experts and a
shared expert.

Shape letters: T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import TextConfig
from shared.model.layers import SwiGLU


class TopKGate(nn.Module):
    """Chooses K experts per token and their weights.

    The correction bias only changes which experts are chosen; weights come from the unbiased
    sigmoid scores, renormalised, then scaled by `routed_scaling_factor`.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        assert config.scoring_func == "sigmoid", config.scoring_func
        assert config.topk_method == "noaux_tc", config.topk_method
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # Kept in float32, as the release stores it.
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(config.n_routed_experts, dtype=torch.float32), requires_grad=False
        )
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, K] and float32 weights [T, K]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()
            choice = grouped.masked_fill(~mask[..., None], 0.0).flatten(1)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [T, K]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    """Routed experts plus the shared expert. `experts` holds the experts this rank owns."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate = TopKGate(config)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        shared_size = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, shared_size) if shared_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)  # [T, K], [T, K]
        out = self.routed(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Runs each expert once on the tokens routed to it and sums the weighted outputs."""
        out = torch.zeros_like(x, dtype=torch.float32)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        token_of = order // ids.shape[1]
        weight_of = weights.flatten()[order]
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            y = self.experts[expert_id](x.index_select(0, tokens))
            out.index_add_(0, tokens, y.float() * weight_of[start : start + count, None])
            start += count
        return out.to(x.dtype)
