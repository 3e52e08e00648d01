"""Expert load statistics: how many tokens each MoE layer routed to each expert.

Counted where the gate runs, so each expert-parallel rank counts its own tokens (a rank's
routed experts see the sum over ranks). Off unless `enable_expert_stats` is called: each MoE
layer then adds a count of its chosen expert ids per forward (an `index_add_`: a bincount
that needs no host sync on GPU) to its row of a shared counts tensor on the model's device. A token counts once per chosen
expert, so a layer's row sums to tokens x `num_experts_per_tok`.
"""

from __future__ import annotations

import torch

from shared.model.moe import MoE


class ExpertStats:
    """Counts since start: `counts[i, e]` tokens routed to expert e by MoE layer `layer_ids[i]`."""

    def __init__(self, layer_ids: list[int], num_experts: int, device: torch.device) -> None:
        self.layer_ids = layer_ids  # model layer index of each row
        self.counts = torch.zeros(len(layer_ids), num_experts, dtype=torch.long, device=device)

    def snapshot(self) -> list[list[int]]:
        """A host copy, one list per MoE layer; another thread may read while the model runs
        (a row may then be one step ahead of another)."""
        return self.counts.tolist()

    def flat(self) -> list[int]:
        """The counts row by row ([layers x experts] flattened), as the heartbeat sends them."""
        return self.counts.flatten().tolist()


def enable_expert_stats(model) -> ExpertStats:
    """Makes every MoE layer of `model` count its routed tokens; returns the counters."""
    moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.layers)
                  if isinstance(layer.mlp, MoE)]  # fmt: skip
    assert moe_layers, "the model has no MoE layer"
    gate = moe_layers[0][1].gate.weight  # [E, D]
    stats = ExpertStats([i for i, _ in moe_layers], gate.shape[0], gate.device)
    for row, (_, moe) in enumerate(moe_layers):
        moe.expert_counts = stats.counts[row]  # a view: the layer adds into its row
    return stats
