"""Model configuration read from a Kimi-K2.5 checkpoint's `config.json`.

The file keeps the real layout: a wrapper with `text_config` (DeepSeek-V3 fields) and
`vision_config` (MoonViT fields, raw `vt_*` keys or their plain spellings). Every architectural
switch the model code uses is a named field here; nothing is inferred from sizes or names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScalingConfig | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    # The MLA-internal norms (q_a_layernorm, kv_a_layernorm) use 1e-6 in DeepSeek's reference
    # code and in transformers, which build them without passing `rms_norm_eps`.
    mla_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token and layer: the normalised latent plus the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    init_pos_emb_height: int
    init_pos_emb_width: int
    init_pos_emb_time: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    merge_kernel_size: tuple[int, int]
    text_hidden_size: int
    projector_ln_eps: float = 1e-5
    pos_emb_type: str = "divided_fixed"
    merge_type: str = "sd2_tpool"
    mm_projector_type: str = "patchmerger"
    projector_hidden_act: str = "gelu"
    video_attn_type: str = "spatial_temporal"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """compressed-tensors `pack-quantized` weight-only INT4 (routed experts only)."""

    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None
    quant: QuantConfig | None
    media_placeholder_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dir(cls, model_path: str | Path) -> ModelConfig:
        raw = json.loads((Path(model_path) / "config.json").read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        text_raw = raw.get("text_config", raw)
        vision_raw = raw.get("vision_config")
        quant_raw = raw.get("quantization_config") or text_raw.get("quantization_config")
        text = _text_config(text_raw)
        return cls(
            text=text,
            vision=_vision_config(vision_raw, text.hidden_size) if vision_raw else None,
            quant=_quant_config(quant_raw) if quant_raw else None,
            media_placeholder_token_id=raw.get("media_placeholder_token_id", 163605),
            bos_token_id=raw.get("bos_token_id", text.bos_token_id),
            eos_token_id=raw.get("eos_token_id", text.eos_token_id),
            pad_token_id=raw.get("pad_token_id", 163839),
            raw=raw,
        )


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _text_config(raw: dict[str, Any]) -> TextConfig:
    values = _fields(TextConfig, raw)
    rope = raw.get("rope_scaling")
    values["rope_scaling"] = RopeScalingConfig(**_fields(RopeScalingConfig, rope)) if rope else None
    values.setdefault("q_lora_rank", None)
    return TextConfig(**values)


def _vision_config(raw: dict[str, Any], text_hidden_size: int) -> VisionConfig:
    def pick(name: str, default: Any = None) -> Any:
        return raw.get(f"vt_{name}", raw.get(name, default))

    return VisionConfig(
        patch_size=raw["patch_size"],
        init_pos_emb_height=raw["init_pos_emb_height"],
        init_pos_emb_width=raw["init_pos_emb_width"],
        init_pos_emb_time=raw.get("init_pos_emb_time", 4),
        num_attention_heads=pick("num_attention_heads"),
        num_hidden_layers=pick("num_hidden_layers"),
        hidden_size=pick("hidden_size"),
        intermediate_size=pick("intermediate_size"),
        merge_kernel_size=tuple(raw.get("merge_kernel_size", (2, 2))),
        text_hidden_size=raw.get("text_hidden_size", text_hidden_size),
        projector_ln_eps=raw.get("projector_ln_eps", 1e-5),
        pos_emb_type=raw.get("pos_emb_type", "divided_fixed"),
        merge_type=raw.get("merge_type", "sd2_tpool"),
        mm_projector_type=raw.get("mm_projector_type", "patchmerger"),
        projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
        video_attn_type=raw.get("video_attn_type", "spatial_temporal"),
    )


def _quant_config(raw: dict[str, Any]) -> QuantConfig:
    assert raw.get("quant_method") == "compressed-tensors", raw.get("quant_method")
    assert raw.get("format") == "pack-quantized", raw.get("format")
    weights = raw["config_groups"]["group_0"]["weights"]
    return QuantConfig(
        num_bits=weights["num_bits"],
        group_size=weights["group_size"],
        symmetric=weights["symmetric"],
    )
