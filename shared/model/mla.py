"""Multi-head latent attention (MLA) with the compressed latent cache and weight absorption.

Shape letters: T tokens, H heads, D hidden, Q q_lora_rank, r kv_lora_rank, R rope dims,
N nope dims (`qk_nope_head_dim`), V value dims (`v_head_dim`).
"""

from __future__ import annotations

import torch
from torch import nn

from shared.attention import AttentionBackend, ForwardBatch
from shared.config import TextConfig
from shared.kv_cache import KVCache
from shared.model.layers import RMSNorm, RotaryEmbedding


class MLAttention(nn.Module):
    """Caches `kv_a_layernorm(c_kv)` and the roped `k_pe`; never per-head keys or values.

    Queries are absorbed into the latent space (`q_nope @ W_UK`), so prefill and decode share
    one attention over [c_kv ‖ k_pe]; outputs leave the latent space through `W_UV`.
    """

    def __init__(self, config: TextConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        hidden, heads = config.hidden_size, config.num_attention_heads
        q_out = heads * config.qk_head_dim
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.mla_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, config.kv_cache_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.mla_norm_eps)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=False)
        self.rotary = rotary

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_a_proj"):
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, backend: AttentionBackend
    ) -> torch.Tensor:
        if x.shape[0] == 0:  # an idle expert-parallel rank: attention is rank-local
            return self.o_proj.weight.new_zeros(0, self.o_proj.out_features)
        q = self._queries(x).view(-1, self.num_heads, self.nope_dim + self.rope_dim)  # [T, H, N+R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = self.rotary(q_pe, batch.positions)  # [T, H, R]

        latent = self.kv_a_proj_with_mqa(x)  # [T, r+R]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [T, r]
        k_pe = self.rotary(k_pe, batch.positions)  # [T, R]
        cache.write(self.layer_id, batch.slots, c_kv, k_pe)

        w_kvb = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        w_uk, w_uv = w_kvb.split([self.nope_dim, self.v_dim], dim=1)  # [H, N, r], [H, V, r]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T, H, r]
        o_lat = backend.forward(self.layer_id, q_lat, q_pe, batch)  # [T, H, r]
        o = torch.einsum("thr,hvr->thv", o_lat, w_uv)  # [T, H, V]
        return self.o_proj(o.flatten(1))
