"""The tiny checkpoint: release layout, names, dtypes, sharding and byte-for-byte determinism."""

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from shared.checkpoint import make_tiny_checkpoint
from shared.config import ModelConfig
from shared.quant import dequantize_int4

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in SHARDS:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def _file_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    start = time.monotonic()
    first = _file_bytes(make_tiny_checkpoint(tmp_path / "a", seed=7))
    assert time.monotonic() - start < 30.0
    second = _file_bytes(make_tiny_checkpoint(tmp_path / "b", seed=7))
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs with the same seed"
    other = _file_bytes(make_tiny_checkpoint(tmp_path / "c", seed=8))
    assert other[SHARDS[0]] != first[SHARDS[0]]


def test_files_and_index(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "tiktoken.model",
        "tokenizer_config.json",
        "chat_template.jinja",
        *SHARDS,
    }
    assert expected <= names
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    tensors = _read_tensors(tiny_checkpoint)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(SHARDS)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    for shard in SHARDS:
        with safe_open(str(tiny_checkpoint / shard), framework="pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())  # noqa: SIM118


def test_config_layout(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["architectures"] == ["KimiK25ForConditionalGeneration"]
    assert raw["model_type"] == "kimi_k25"
    assert raw["quantization_config"] == raw["text_config"]["quantization_config"]
    assert raw["text_config"]["rope_scaling"]["factor"] == 64.0
    assert {"vt_hidden_size", "vt_num_hidden_layers", "init_pos_emb_time"} <= set(
        raw["vision_config"]
    )
    config = ModelConfig.from_dir(tiny_checkpoint)
    text = config.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 3, 4)
    assert (text.q_lora_rank, text.kv_lora_rank, text.qk_head_dim, text.v_head_dim) == (
        48,
        32,
        24,
        16,
    )
    assert (text.n_routed_experts, text.num_experts_per_tok, text.n_shared_experts) == (16, 4, 1)
    assert [text.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert text.rope_scaling.mscale_all_dim == 1.0 and text.vocab_size == 2048
    assert config.vision.hidden_size == 64 and config.vision.merge_kernel_size == (2, 2)
    assert config.quant.group_size == 32 and config.quant.num_bits == 4
    assert config.bos_token_id != config.eos_token_id != config.pad_token_id
    assert config.media_placeholder_token_id >= 1792
    media = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())["media_proc_cfg"]
    assert media["in_patch_limit"] == 16384 and media["patch_size"] == 14


def test_tensor_names_shapes_dtypes(tiny_checkpoint):
    tensors = _read_tensors(tiny_checkpoint)
    layer0, layer2 = "language_model.model.layers.0", "language_model.model.layers.2"
    expect = {
        "language_model.model.embed_tokens.weight": ((2048, 128), torch.bfloat16),
        "language_model.lm_head.weight": ((2048, 128), torch.bfloat16),
        f"{layer0}.self_attn.q_b_proj.weight": ((96, 48), torch.bfloat16),
        f"{layer0}.self_attn.kv_a_proj_with_mqa.weight": ((40, 128), torch.bfloat16),
        f"{layer0}.self_attn.kv_b_proj.weight": ((128, 32), torch.bfloat16),
        f"{layer0}.self_attn.o_proj.weight": ((128, 64), torch.bfloat16),
        f"{layer0}.mlp.down_proj.weight": ((128, 192), torch.bfloat16),
        f"{layer2}.mlp.gate.weight": ((16, 128), torch.bfloat16),
        f"{layer2}.mlp.gate.e_score_correction_bias": ((16,), torch.float32),
        f"{layer2}.mlp.shared_experts.up_proj.weight": ((64, 128), torch.bfloat16),
        f"{layer2}.mlp.experts.15.up_proj.weight_packed": ((64, 16), torch.int32),
        f"{layer2}.mlp.experts.15.up_proj.weight_scale": ((64, 4), torch.bfloat16),
        f"{layer2}.mlp.experts.15.down_proj.weight_packed": ((128, 8), torch.int32),
        f"{layer2}.mlp.experts.15.down_proj.weight_scale": ((128, 2), torch.bfloat16),
        f"{layer2}.mlp.experts.15.down_proj.weight_shape": ((2,), torch.int32),
        "vision_tower.patch_embed.proj.weight": ((64, 3, 14, 14), torch.bfloat16),
        "vision_tower.patch_embed.pos_emb.weight": ((64, 64, 64), torch.bfloat16),
        "vision_tower.encoder.blocks.1.wqkv.weight": ((192, 64), torch.bfloat16),
        "vision_tower.encoder.blocks.1.mlp.fc0.weight": ((128, 64), torch.bfloat16),
        "vision_tower.encoder.final_layernorm.bias": ((64,), torch.bfloat16),
        "mm_projector.pre_norm.weight": ((64,), torch.bfloat16),
        "mm_projector.proj.0.weight": ((256, 256), torch.bfloat16),
        "mm_projector.proj.2.weight": ((128, 256), torch.bfloat16),
    }
    for name, (shape, dtype) in expect.items():
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype, name
    assert not any(".layers.0.mlp.experts" in n or ".layers.0.mlp.gate." in n for n in tensors)
    assert sum(n.endswith("weight_packed") for n in tensors) == 2 * 16 * 3
    assert tensors[f"{layer2}.mlp.experts.15.down_proj.weight_shape"].tolist() == [128, 64]
    float_dtypes = {t.dtype for n, t in tensors.items() if not n.endswith(("_packed", "_shape"))}
    assert float_dtypes == {torch.bfloat16, torch.float32}


def test_weights_keep_activations_order_one(tiny_checkpoint):
    tensors = _read_tensors(tiny_checkpoint)
    prefix = "language_model.model.layers.1.mlp.experts.3.gate_proj"
    weight = dequantize_int4(
        *(tensors[f"{prefix}.weight_{s}"] for s in ("packed", "scale", "shape"))
    )
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    assert 0.5 < float((x @ weight.float().T).std()) < 2.0


def test_correction_bias_changes_expert_choice(tiny_checkpoint):
    tensors = _read_tensors(tiny_checkpoint)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    for layer_id in (1, 2):
        gate = f"language_model.model.layers.{layer_id}.mlp.gate"
        bias = tensors[f"{gate}.e_score_correction_bias"]
        assert float(bias.std()) > 0.01 and len(set(bias.tolist())) == 16
        scores = torch.sigmoid(x @ tensors[f"{gate}.weight"].float().T)
        plain = scores.topk(4, dim=-1).indices.sort(dim=-1).values
        biased = (scores + bias).topk(4, dim=-1).indices.sort(dim=-1).values
        changed = float((plain != biased).any(dim=-1).float().mean())
        assert changed > 0.2, f"layer {layer_id}: bias changes the choice for {changed:.0%} only"
