"""The Kimi-K2.5 text model: DeepSeek-V3 decoder layers over the paged latent cache.

Shape letters: T tokens in the batch, D hidden size, B sequences, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.attention import AttentionBackend, ForwardBatch
from shared.config import TextConfig
from shared.kv_cache import KVCache
from shared.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from shared.model.mla import MLAttention
from shared.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_id, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, backend: AttentionBackend
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch, cache, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class KimiTextModel(nn.Module):
    """Embeddings, decoder layers, final norm and the untied LM head."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        cache: KVCache,
        backend: AttentionBackend,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Runs the batch, writing its latents into `cache`.

        Returns logits [B, V] of each sequence's last new token, or [T, V] with `all_logits`.
        """
        x = batch.input_embeds
        if x is None:
            x = self.embed_tokens(batch.input_ids)  # [T, D]
        for layer in self.layers:
            x = layer(x, batch, cache, backend)
        if not all_logits:
            last = torch.tensor(batch.q_lens, dtype=torch.long, device=x.device).cumsum(0) - 1
            x = x.index_select(0, last)  # [B, D]
        return self.lm_head(self.norm(x)).float()
