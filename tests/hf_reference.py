"""Test helper: the tiny checkpoint run through transformers' own Kimi-K2.5 implementation.

transformers reads the release tensor names through its conversion mapping, but not the raw
`vt_*` vision keys nor compressed-tensors experts without the `compressed-tensors` integration.
`translate_checkpoint` therefore writes a copy for it: vision keys renamed to transformers'
spelling, routed experts dequantized to plain fp32 `.weight` tensors (exact, so both sides see
the same numbers), `quantization_config` removed and embeddings untied. Every other tensor keeps
its release name and bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.quant import dequantize_int4

_PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def translate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' `Kimi_K25Config` dict for a release-layout `config.json`."""
    text = {k: v for k, v in raw["text_config"].items() if k != "quantization_config"}
    text["model_type"] = "deepseek_v3"
    text["tie_word_embeddings"] = False
    vision_raw = raw["vision_config"]
    vision = {
        "model_type": "kimi_k25_vision",
        "patch_size": vision_raw["patch_size"],
        "pos_emb_height": vision_raw["init_pos_emb_height"],
        "pos_emb_width": vision_raw["init_pos_emb_width"],
        "pos_emb_time": vision_raw["init_pos_emb_time"],
        "num_attention_heads": vision_raw["vt_num_attention_heads"],
        "num_hidden_layers": vision_raw["vt_num_hidden_layers"],
        "hidden_size": vision_raw["vt_hidden_size"],
        "intermediate_size": vision_raw["vt_intermediate_size"],
        "hidden_act": "gelu_pytorch_tanh",
        "merge_kernel_size": list(vision_raw["merge_kernel_size"]),
    }
    return {
        "architectures": ["Kimi_K25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": vision,
        "projection_hidden_size": vision_raw["mm_hidden_size"],
        "projection_layer_norm_eps": vision_raw["projector_ln_eps"],
        "image_token_id": raw["media_placeholder_token_id"],
        "bos_token_id": raw["bos_token_id"],
        "eos_token_id": raw["eos_token_id"],
        "pad_token_id": raw["pad_token_id"],
        "tie_word_embeddings": False,
    }


def translate_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All checkpoint tensors, with each packed INT4 expert replaced by its fp32 `.weight`."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = f.get_tensor(name)
    stems = sorted({n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed")})
    for stem in stems:
        packed, scale, shape = (tensors.pop(stem + suffix) for suffix in _PACKED_SUFFIXES)
        tensors[f"{stem}.weight"] = dequantize_int4(packed, scale, shape, torch.float32)
    leftover = [n for n in tensors if n.endswith(_PACKED_SUFFIXES)]
    assert not leftover, f"incomplete packed tensors: {leftover[:3]}"
    return tensors


def translate_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the transformers-loadable copy of `model_dir` into `out_dir`."""
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(translate_config(raw), indent=2))
    save_file(
        translate_tensors(model_dir), str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


def load_hf_model(model_dir: str | Path, work_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """transformers' `Kimi_K25ForConditionalGeneration` in fp32 (eager attention) and its
    loading info (missing / unexpected / mismatched keys)."""
    from transformers import Kimi_K25ForConditionalGeneration

    hf_dir = translate_checkpoint(model_dir, work_dir)
    model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        str(hf_dir),
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
    )
    return model.eval(), info


@torch.no_grad()
def hf_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, V] (float32) of every position of one prompt, no cache."""
    input_ids = torch.tensor([token_ids], dtype=torch.long)
    return model(input_ids=input_ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(model: Any, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation recomputed from scratch each step (no cache, no stop tokens)."""
    sequence = list(token_ids)
    for _ in range(max_new_tokens):
        sequence.append(int(hf_logits(model, sequence)[-1].argmax()))
    return sequence[len(token_ids) :]
