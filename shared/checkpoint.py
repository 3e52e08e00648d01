"""A tiny random checkpoint with Kimi-K2.5's exact architecture, tensor names and file format.

It keeps every feature of the release (MLA with q/kv LoRA, YaRN, one dense layer then MoE layers
with a shared expert and a sigmoid `noaux_tc` router, INT4 pack-quantized routed experts,
MoonViT-3D tower and patch-merger projector, sharded safetensors with an index, tiktoken
tokenizer files) at sizes that run on a CPU in milliseconds. Weights are seeded random values,
scaled so activations stay O(1) through the layers; the same seed gives the same bytes.
A larger size of the same architecture (`size="bench"`) serves the engine benchmark, and one with
Kimi-K2.5's full layer width but few layers and experts (`size="gpu"`) the GPU check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shared.quant import quantize_int4

logger = logging.getLogger(__name__)

NUM_BASE_TOKENS = 1792
NUM_SHARDS = 2

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 192,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 262144,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "initializer_range": 0.02,
    "use_cache": True,
}

VISION_CONFIG: dict[str, Any] = {
    "patch_size": 14,
    "init_pos_emb_height": 64,
    "init_pos_emb_width": 64,
    "init_pos_emb_time": 4,
    "pos_emb_type": "divided_fixed",
    "vt_num_attention_heads": 4,
    "vt_num_hidden_layers": 2,
    "vt_hidden_size": 64,
    "vt_intermediate_size": 128,
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "video_attn_type": "spatial_temporal",
    "mm_projector_type": "patchmerger",
    "mm_hidden_size": 64,
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-5,
}

QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
                "dynamic": False,
                "observer": "minmax",
                "actorder": None,
            },
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
}

# Text sizes other than tiny, as overrides of `TEXT_CONFIG`; the vocabulary (and so the tokenizer)
# and every switch stay the same. "bench" is wider, deeper and has more experts, for
# `bench/engine.py`.
TEXT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "bench": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
    },
    # Kimi-K2.5's full layer width (hidden, heads, MLA dims, dense and expert MLP widths) for
    # the serving run of `bench/gpu_check.sh`. 4 layers (the dense first layer + 3 MoE layers)
    # and 16 routed experts (8 per token, as the release) give 3.1 G parameters: 6 GB in bf16
    # per worker on the GPU, 2.9 GiB on disk (INT4 experts). Generating it took 2 minutes and
    # loading it (INT4 dequantized on the CPU) 2 minutes on a busy 2-core machine. The
    # release's 384 experts would take 34 GB per MoE layer in bf16 and far longer to generate
    # and load than the check's 10 minutes allow.
    "gpu": {
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 16,
        "num_experts_per_tok": 8,
    },
}

MEDIA_PROC_CONFIG: dict[str, Any] = {
    "patch_size": 14,
    "merge_kernel_size": 2,
    "in_patch_limit": 16384,
    "patch_limit_on_one_side": 512,
    "fixed_output_tokens": None,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "in_patch_limit_each_frame": 4096,
    "in_patch_limit_video": None,
    "sample_fps": 2.0,
    "max_num_frames_each_video": None,
    "temporal_merge_kernel_size": 4,
    "timestamp_mode": "hh:mm:ss.fff",
}


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed) and return its path.

    `size` names an entry of `TEXT_SIZES` ("tiny", the larger "bench", or "gpu"). Files:
    `config.json`, `generation_config.json`, `preprocessor_config.json`,
    `model-0000N-of-00002.safetensors`, `model.safetensors.index.json`, and the tokenizer files
    written by
    `shared.tokenizer_train.write_tokenizer_files`. Existing files are overwritten.
    """
    from shared.tokenizer_train import write_tokenizer_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer_files(out, num_base_tokens=NUM_BASE_TOKENS)
    config = build_config(token_ids, size)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(token_ids))
    _write_json(out / "preprocessor_config.json", _preprocessor_config())
    tensors = build_tensors(config, torch.Generator().manual_seed(seed))
    _write_shards(out, tensors)
    logger.info("wrote %s checkpoint to %s (%d tensors)", size, out, len(tensors))
    return out


def build_config(token_ids: dict[str, int], size: str = "tiny") -> dict[str, Any]:
    """The wrapper `config.json` in the release layout, with the sizes of `TEXT_SIZES[size]` and
    the token ids that `write_tokenizer_files` returned."""
    assert token_ids["vocab_size"] == TEXT_CONFIG["vocab_size"], token_ids
    if size not in TEXT_SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}; sizes: {', '.join(TEXT_SIZES)}")
    text_sizes = {**TEXT_CONFIG, **TEXT_SIZES[size]}
    ids = {name: token_ids[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        **text_sizes,
        **ids,
        "quantization_config": QUANTIZATION_CONFIG,
    }
    vision = {**VISION_CONFIG, "text_hidden_size": text_sizes["hidden_size"]}
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        },
        "model_type": "kimi_k25",
        "dtype": "bfloat16",
        **ids,
        "media_placeholder_token_id": token_ids["media_placeholder_token_id"],
        "ignore_index": -100,
        "tie_word_embeddings": False,
        "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "text_config": text,
        "vision_config": vision,
        "quantization_config": QUANTIZATION_CONFIG,
    }


def _generation_config(token_ids: dict[str, int]) -> dict[str, Any]:
    # Chat turns end with <|im_end|>, so that is the generation stop token (config eos is [EOS]).
    return {
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["im_end_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
        "max_length": TEXT_CONFIG["max_position_embeddings"],
    }


def _preprocessor_config() -> dict[str, Any]:
    return {
        "auto_map": {
            "AutoProcessor": "kimi_k25_processor.KimiK25Processor",
            "AutoImageProcessor": "kimi_k25_vision_processing.KimiK25VisionProcessor",
        },
        "media_proc_cfg": MEDIA_PROC_CONFIG,
    }


class _Init:
    """Seeded draws of bf16 weights, in a fixed order."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def linear(self, out_features: int, in_features: int) -> torch.Tensor:
        # Unit-variance inputs give unit-variance outputs.
        return self.normal(out_features, in_features, std=in_features**-0.5).to(torch.bfloat16)

    def norm(self, dim: int) -> torch.Tensor:
        return (1.0 + self.normal(dim, std=0.1)).to(torch.bfloat16)

    def bias(self, dim: int) -> torch.Tensor:
        return self.normal(dim, std=0.02).to(torch.bfloat16)


def build_tensors(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its release name, in the release's shard order."""
    init = _Init(gen)
    text = config["text_config"]
    tensors: dict[str, torch.Tensor] = {}
    for layer_id in range(text["num_hidden_layers"]):
        prefix = f"language_model.model.layers.{layer_id}"
        tensors.update(_attention(init, text, f"{prefix}.self_attn"))
        if layer_id >= text["first_k_dense_replace"]:
            tensors.update(_moe(init, text, f"{prefix}.mlp"))
        else:
            tensors.update(
                _mlp(init, text["hidden_size"], text["intermediate_size"], f"{prefix}.mlp")
            )
        tensors[f"{prefix}.input_layernorm.weight"] = init.norm(text["hidden_size"])
        tensors[f"{prefix}.post_attention_layernorm.weight"] = init.norm(text["hidden_size"])
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    tensors["language_model.model.embed_tokens.weight"] = init.normal(vocab, hidden, std=1.0).to(
        torch.bfloat16
    )
    tensors["language_model.model.norm.weight"] = init.norm(hidden)
    tensors["language_model.lm_head.weight"] = init.linear(vocab, hidden)
    tensors.update(_projector(init, config["vision_config"]))
    tensors.update(_vision_tower(init, config["vision_config"]))
    return tensors


def _attention(init: _Init, text: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    q_rank, kv_rank = text["q_lora_rank"], text["kv_lora_rank"]
    nope, rope, v_dim = text["qk_nope_head_dim"], text["qk_rope_head_dim"], text["v_head_dim"]
    return {
        f"{prefix}.q_a_proj.weight": init.linear(q_rank, hidden),
        f"{prefix}.q_a_layernorm.weight": init.norm(q_rank),
        f"{prefix}.q_b_proj.weight": init.linear(heads * (nope + rope), q_rank),
        f"{prefix}.kv_a_proj_with_mqa.weight": init.linear(kv_rank + rope, hidden),
        f"{prefix}.kv_a_layernorm.weight": init.norm(kv_rank),
        f"{prefix}.kv_b_proj.weight": init.linear(heads * (nope + v_dim), kv_rank),
        f"{prefix}.o_proj.weight": init.linear(hidden, heads * v_dim),
    }


def _mlp(init: _Init, hidden: int, inter: int, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.gate_proj.weight": init.linear(inter, hidden),
        f"{prefix}.up_proj.weight": init.linear(inter, hidden),
        f"{prefix}.down_proj.weight": init.linear(hidden, inter),
    }


def _moe(init: _Init, text: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    hidden, inter = text["hidden_size"], text["moe_intermediate_size"]
    num_experts = text["n_routed_experts"]
    tensors: dict[str, torch.Tensor] = {}
    for expert in range(num_experts):
        shapes = {
            "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden),
            "down_proj": (hidden, inter),
        }
        for proj, (out_features, in_features) in shapes.items():
            weight = init.normal(out_features, in_features, std=in_features**-0.5)
            packed, scale, shape = quantize_int4(weight)
            name = f"{prefix}.experts.{expert}.{proj}"
            tensors[f"{name}.weight_packed"] = packed
            tensors[f"{name}.weight_scale"] = scale
            tensors[f"{name}.weight_shape"] = shape
    tensors[f"{prefix}.gate.weight"] = init.linear(num_experts, hidden)
    # Sigmoid affinities of neighbouring ranks differ by a few hundredths; a bias of this size
    # reorders them often, so choosing experts without it gives visibly different outputs.
    tensors[f"{prefix}.gate.e_score_correction_bias"] = init.normal(num_experts, std=0.05)
    shared_inter = inter * text["n_shared_experts"]
    tensors.update(_mlp(init, hidden, shared_inter, f"{prefix}.shared_experts"))
    return tensors


def _projector(init: _Init, vision: dict[str, Any]) -> dict[str, torch.Tensor]:
    width = vision["vt_hidden_size"]
    merged = width * vision["merge_kernel_size"][0] * vision["merge_kernel_size"][1]
    text_hidden = vision["text_hidden_size"]
    return {
        "mm_projector.pre_norm.weight": init.norm(width),
        "mm_projector.pre_norm.bias": init.bias(width),
        "mm_projector.proj.0.weight": init.linear(merged, merged),
        "mm_projector.proj.0.bias": init.bias(merged),
        "mm_projector.proj.2.weight": init.linear(text_hidden, merged),
        "mm_projector.proj.2.bias": init.bias(text_hidden),
    }


def _vision_tower(init: _Init, vision: dict[str, Any]) -> dict[str, torch.Tensor]:
    width, inter, patch = (
        vision["vt_hidden_size"],
        vision["vt_intermediate_size"],
        vision["patch_size"],
    )
    fan_in = 3 * patch * patch
    tensors = {
        "vision_tower.patch_embed.proj.weight": init.normal(
            width, 3, patch, patch, std=fan_in**-0.5
        ).to(torch.bfloat16),
        "vision_tower.patch_embed.proj.bias": init.bias(width),
        "vision_tower.patch_embed.pos_emb.weight": init.normal(
            vision["init_pos_emb_height"], vision["init_pos_emb_width"], width, std=0.5
        ).to(torch.bfloat16),
    }
    for block in range(vision["vt_num_hidden_layers"]):
        prefix = f"vision_tower.encoder.blocks.{block}"
        tensors.update(
            {
                f"{prefix}.norm0.weight": init.norm(width),
                f"{prefix}.norm0.bias": init.bias(width),
                f"{prefix}.wqkv.weight": init.linear(3 * width, width),
                f"{prefix}.wqkv.bias": init.bias(3 * width),
                f"{prefix}.wo.weight": init.linear(width, width),
                f"{prefix}.wo.bias": init.bias(width),
                f"{prefix}.norm1.weight": init.norm(width),
                f"{prefix}.norm1.bias": init.bias(width),
                f"{prefix}.mlp.fc0.weight": init.linear(inter, width),
                f"{prefix}.mlp.fc0.bias": init.bias(inter),
                f"{prefix}.mlp.fc1.weight": init.linear(width, inter),
                f"{prefix}.mlp.fc1.bias": init.bias(width),
            }
        )
    tensors["vision_tower.encoder.final_layernorm.weight"] = init.norm(width)
    tensors["vision_tower.encoder.final_layernorm.bias"] = init.bias(width)
    return tensors


def _write_shards(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Split at half the bytes in tensor order, so one layer's tensors may span two shards."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(NUM_SHARDS)]
    written = 0
    for name, tensor in tensors.items():
        index = min(written * NUM_SHARDS // total, NUM_SHARDS - 1)
        shards[index][name] = tensor.contiguous()
        written += sizes[name]
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index_json)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
