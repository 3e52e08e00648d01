"""Loads the text model from Hugging Face-format safetensors with the real Kimi-K2.5 names.

Accepted prefixes: `language_model.model.*` / `language_model.lm_head.*` (the release),
`language_model.layers.*` (legacy NVFP4 naming) and `model.*` / `lm_head.*` (DeepSeek-V3).
Routed experts stored as compressed-tensors `pack-quantized` INT4 are dequantized at load time.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from shared.config import ModelConfig
from shared.model.layers import RotaryEmbedding
from shared.model.moe import MoE
from shared.model.text import KimiTextModel
from shared.quant import dequantize_int4

logger = logging.getLogger(__name__)

_PREFIXES = [
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", ""),
    ("model.", ""),
]
_NON_TEXT = ("vision_tower.", "mm_projector.", "multi_modal_projector.")
_PACKED = re.compile(r"^(.*)\.weight_(packed|scale|shape)$")


def text_param_name(checkpoint_name: str) -> str | None:
    """Our parameter name for a checkpoint tensor, or None when it is not part of the text model."""
    if checkpoint_name.startswith(_NON_TEXT):
        return None
    for prefix, replacement in _PREFIXES:
        if checkpoint_name.startswith(prefix):
            return replacement + checkpoint_name[len(prefix) :]
    return checkpoint_name


def checkpoint_files(model_path: str | Path) -> list[Path]:
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_path}")
    return files


def load_text_model(
    model_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    owned_experts: list[int] | None = None,
) -> KimiTextModel:
    """Builds the text model and fills every parameter from the checkpoint.

    With `owned_experts` (expert parallelism) only those routed experts of each MoE layer are
    built and read; the others' tensors are skipped. Raises if a parameter has no tensor in the
    checkpoint or a text tensor has no parameter.
    """
    config = ModelConfig.from_dir(model_path)
    with torch.device("meta"):
        model = KimiTextModel(config.text)
    skipped = _drop_foreign_experts(model, owned_experts)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    packed: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for path in checkpoint_files(model_path):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                target = text_param_name(name)
                if target is None or _expert_key(target) in skipped:
                    continue
                match = _PACKED.match(target)
                if match:
                    packed[match.group(1)][match.group(2)] = f.get_tensor(name)
                    continue
                _assign(model, params, target, f.get_tensor(name), dtype, device)
                loaded.add(target)
    for stem, parts in packed.items():
        weight = dequantize_int4(parts["packed"], parts["scale"], parts["shape"], torch.float32)
        _assign(model, params, f"{stem}.weight", weight, dtype, device)
        loaded.add(f"{stem}.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    _rebuild_buffers(model, device)
    logger.info("loaded text model from %s (%d tensors)", model_path, len(loaded))
    return model.eval()


_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _expert_key(name: str) -> tuple[int, int] | None:
    match = _EXPERT.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _drop_foreign_experts(model: KimiTextModel, owned: list[int] | None) -> set:
    """Replaces the routed experts this rank does not own by empty modules; returns their keys."""
    if owned is None:
        return set()
    keep, skipped = set(owned), set()
    for layer_id, layer in enumerate(model.layers):
        if not isinstance(layer.mlp, MoE):
            continue
        for expert_id in range(len(layer.mlp.experts)):
            if expert_id not in keep:
                layer.mlp.experts[expert_id] = nn.Module()
                skipped.add((layer_id, expert_id))
    return skipped


def _assign(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    device: str,
) -> None:
    if name not in params:
        raise ValueError(f"unexpected tensor in checkpoint: {name}")
    expected = params[name]
    if tuple(tensor.shape) != tuple(expected.shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}")
    keep_fp32 = name.endswith("e_score_correction_bias")
    value = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _rebuild_buffers(model: KimiTextModel, device: str) -> None:
    config = model.config
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
            module.inv_freq = fresh.inv_freq.to(device)
