"""Mixture-of-experts block: sigmoid `noaux_tc` gate with correction bias, routed experts and a
shared expert.

Shape letters: T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import TextConfig
from shared.model.expert_parallel import EPContext, ep_routed
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
    """Routed experts plus the shared expert. `experts` holds the experts this rank owns.

    Routed experts run grouped: the routed rows are gathered once, sorted by expert, and each
    expert with work runs its gate and up projections as one product over its contiguous rows;
    the weighted outputs go back with one `index_add_`. The weights are stacked once into
    `[E, 2I, D]` (gate and up) and `[E, D, I]` (down) tensors, and each expert's own parameters
    become views of the stacks, so the stacks cost no memory and follow in-place weight updates.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate = TopKGate(config)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        shared_size = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, shared_size) if shared_size else None
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stack_ptrs: list[int] = []
        self.ep: EPContext | None = None  # expert parallelism: this rank holds some experts
        self._local_stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.expert_counts: torch.Tensor | None = None  # [E] tokens per expert (expert_stats.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)  # [T, K], [T, K]
        if self.expert_counts is not None:  # a bincount; CUDA's `bincount` would sync
            flat = ids.flatten()
            self.expert_counts.index_add_(0, flat, torch.ones_like(flat))
        if self.ep is None:
            out = self.routed(x, ids, weights)
        else:
            out = ep_routed(x, ids, weights, *self._owned_stacks(), self.ep)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Runs each expert once on the tokens routed to it and sums the weighted outputs."""
        flat_ids = ids.flatten()  # [T*K]
        order = flat_ids.argsort(stable=True)  # routed rows grouped by expert
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        token_of = order // ids.shape[1]
        w13, w2 = self._stacked_weights()  # [E, 2I, D], [E, D, I]
        outputs = []
        for expert_id, rows in enumerate(x.index_select(0, token_of).split(counts)):
            if rows.shape[0] == 0:
                continue
            gate, up = F.linear(rows, w13[expert_id]).chunk(2, dim=-1)  # [n, I] each
            outputs.append(F.linear(F.silu(gate) * up, w2[expert_id]))  # [n, D]
        if not outputs:  # no tokens (an idle rank's empty step)
            return torch.zeros_like(x)
        y = torch.cat(outputs).float() * weights.flatten()[order, None]  # [T*K, D]
        out = torch.zeros_like(x, dtype=torch.float32).index_add_(0, token_of, y)
        return out.to(x.dtype)

    def _owned_stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[E_local, 2I, D] and [E_local, D, I] of the experts this rank owns, in expert order."""
        if self._local_stacks is None:
            local = [self.experts[e] for e in self.ep.placement.local_experts(self.ep.rank)]
            w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in local])
            w2 = torch.stack([e.down_proj.weight for e in local])
            self._local_stacks = (w13, w2)
        return self._local_stacks

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked expert weights, rebuilt when the experts' parameters were replaced."""
        if self._stacks is None or self._expert_ptrs() != self._stack_ptrs:
            self._stacks = self._stack_experts()
            self._stack_ptrs = self._expert_ptrs()
        return self._stacks

    def _expert_ptrs(self) -> list[int]:
        return [
            proj.weight.data_ptr()
            for expert in self.experts
            for proj in (expert.gate_proj, expert.up_proj, expert.down_proj)
        ]

    @torch.no_grad()
    def _stack_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False):  # parameters must not become inference tensors
            w13 = torch.stack(
                [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts]
            )  # [E, 2I, D]
            w2 = torch.stack([e.down_proj.weight for e in self.experts])  # [E, D, I]
            inter = w2.shape[-1]
            for expert, gate_up, down in zip(self.experts, w13, w2):
                expert.gate_proj.weight.data = gate_up[:inter]
                expert.up_proj.weight.data = gate_up[inter:]
                expert.down_proj.weight.data = down
        return w13, w2
