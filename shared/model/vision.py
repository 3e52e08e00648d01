"""MoonViT-3D, the 2x2 patch merger and the projector of Kimi-K2.5 (spec section 6).

`KimiVisionModel.encode` turns the patches of several images (packed one after another, no
padding) into one embedding per placeholder token of each image, in the text hidden size.
Parameter names equal the checkpoint's (`vision_tower.*`, `mm_projector.*`).

Shape letters: L patches of all items in the batch, S patches of one item, D vision hidden size,
H heads, K head dim, P patch size, N merged tokens of one item, E text hidden size.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from shared.config import ModelConfig, VisionConfig
from shared.model.loader import checkpoint_files

logger = logging.getLogger(__name__)

# MoonViT constants that the release's config does not carry as fields.
ROPE_THETA = 10000.0
ENCODER_NORM_EPS = 1e-5
TEMPORAL_THETA = 10000.0
VISION_PREFIXES = ("vision_tower.", "mm_projector.")

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns) of one item


class PositionEmbedding2D(nn.Module):
    """The learned [64, 64, D] table, resampled (bicubic) to each item's patch grid."""

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(height, width, dim))

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[gh * gw, D], rows in row-major patch order."""
        table = self.weight
        if (grid_h, grid_w) != tuple(table.shape[:2]):
            grid = table.float().permute(2, 0, 1)[None]  # [1, D, 64, 64]
            grid = F.interpolate(grid, (grid_h, grid_w), mode="bicubic", align_corners=False)
            table = grid[0].permute(1, 2, 0)  # [gh, gw, D]
        return table.flatten(0, 1).to(self.weight.dtype)


def temporal_embedding(num_frames: int, dim: int) -> torch.Tensor:
    """[t, D] fixed sin-cos vectors of frames 0..t-1; only video chunks (t > 1) add them."""
    half = dim // 2
    omega = TEMPORAL_THETA ** (-torch.arange(half, dtype=torch.float32) / half)  # [D/2]
    angles = torch.arange(num_frames, dtype=torch.float32)[:, None] * omega  # [t, D/2]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)  # [t, D]


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        patch, dim = config.patch_size, config.hidden_size
        # A convolution with stride = kernel over a whole patch, applied as a linear layer.
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_emb = PositionEmbedding2D(
            config.init_pos_emb_height, config.init_pos_emb_width, dim
        )

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [D, 3 * P * P]
        x = F.linear(pixel_values.flatten(1), weight, self.proj.bias)  # [L, D]
        positions = []
        for t, h, w in grids:
            pos = self.pos_emb(h, w).repeat(t, 1)  # [S, D]
            if t > 1:
                frames = temporal_embedding(t, x.shape[-1]).repeat_interleave(h * w, dim=0)
                pos = pos + frames.to(pos.device, pos.dtype)  # [S, D]
            positions.append(pos)
        return x + torch.cat(positions)  # [L, D]


def rope_2d_angles(grid: Grid, head_dim: int) -> torch.Tensor:
    """[S, K/2] rotation angle of each complex pair: pair 2i by col * nu_i, 2i+1 by row * nu_i."""
    t, h, w = grid
    nu = ROPE_THETA ** (-4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim)
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)  # [h * w]
    cols = torch.arange(w, dtype=torch.float32).repeat(h)  # [h * w]
    angles = torch.stack((cols[:, None] * nu, rows[:, None] * nu), dim=-1)  # [h * w, K/4, 2]
    return angles.flatten(1).repeat(t, 1)  # [S, K/2]; frames share the spatial angles


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [L, H, K] rotated pairwise (x[2j], x[2j+1]) by angles [L, K/2], in float32."""
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [L, 1, K/2]
    pairs = x.float().unflatten(-1, (-1, 2))  # [L, H, K/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)  # [L, H, K]


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm encoder block; attention is bidirectional within each item of the batch."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.norm0 = nn.LayerNorm(dim, eps=ENCODER_NORM_EPS)
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_NORM_EPS)
        self.mlp = VisionMLP(dim, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor, cu_seqlens: Sequence[int]
    ) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), angles, cu_seqlens)
        return x + self.mlp(self.norm1(x))

    def attention(
        self, x: torch.Tensor, angles: torch.Tensor, cu_seqlens: Sequence[int]
    ) -> torch.Tensor:
        qkv = self.wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)  # [L, 3, H, K]
        q, k, v = qkv.unbind(1)  # [L, H, K] each
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = torch.empty_like(q)
        # Limitation: one attention call per item; on GPU a varlen kernel over cu_seqlens
        # (flash-attention style) would run all items of the batch in one call.
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            item = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, S, K] each
            out[start:end] = F.scaled_dot_product_attention(*item).transpose(0, 1)
        return self.wo(out.flatten(1))  # [L, D]


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=ENCODER_NORM_EPS)

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor, cu_seqlens: Sequence[int]
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, angles, cu_seqlens)
        return self.final_layernorm(x)


class MoonViT(nn.Module):
    """Patch embedding and encoder: patches [L, 3, P, P] to features [L, D]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.patch_embed = PatchEmbed(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        x = self.patch_embed(pixel_values, grids)  # [L, D]
        angles = torch.cat([rope_2d_angles(g, self.head_dim) for g in grids]).to(x.device)
        cu_seqlens = [0, *itertools.accumulate(t * h * w for t, h, w in grids)]
        return self.encoder(x, angles, cu_seqlens)  # [L, D]


class PatchMergerProjector(nn.Module):
    """Groups each 2x2 block of patches (mean over frames) and projects it to the text width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        merged = dim * math.prod(config.merge_kernel_size)
        self.merge_kernel_size = tuple(config.merge_kernel_size)
        self.pre_norm = nn.LayerNorm(dim, eps=config.projector_ln_eps)
        self.proj = nn.Sequential(
            nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.text_hidden_size)
        )

    def merge(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[S, D] features of one item to [N, kh * kw, D] groups, sub-patches row-major."""
        (t, h, w), (kh, kw) = grid, self.merge_kernel_size
        x = features.view(t, h // kh, kh, w // kw, kw, -1)  # [t, h/kh, kh, w/kw, kw, D]
        x = x.float().mean(0).to(features.dtype)  # [h/kh, kh, w/kw, kw, D]
        return x.permute(0, 2, 1, 3, 4).reshape((h // kh) * (w // kw), kh * kw, -1)  # [N, 4, D]

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pre_norm(groups).flatten(1))  # [N, E]


class KimiVisionModel(nn.Module):
    """MoonViT and the projector, named as in the checkpoint."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        _check_supported(config)
        self.config = config
        self.vision_tower = MoonViT(config)
        self.mm_projector = PatchMergerProjector(config)

    @torch.inference_mode()
    def encode(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Embeddings [N_i, E] of each item, in the order of `grid_thws`.

        pixel_values: [L, 3, P, P], the items' patches one after another (row-major within a
        frame, frames in order), as `shared.image_processing.preprocess_image` makes them.
        grid_thws: one (t, gh, gw) per item; gh and gw divisible by the merge kernel, t at most
        `init_pos_emb_time`. N_i = (gh / 2) * (gw / 2) for the 2x2 kernel.
        """
        grids = self._grids(pixel_values, grid_thws)
        weight = self.mm_projector.pre_norm.weight
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)
        features = self.vision_tower(x, grids)  # [L, D]
        sizes = [t * h * w for t, h, w in grids]
        merged = [
            self.mm_projector.merge(item, grid) for item, grid in zip(features.split(sizes), grids)
        ]
        out = self.mm_projector(torch.cat(merged))  # [sum N_i, E]
        return list(out.split([m.shape[0] for m in merged]))

    def _grids(
        self, pixel_values: torch.Tensor, grid_thws: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[Grid]:
        rows = grid_thws.tolist() if isinstance(grid_thws, torch.Tensor) else grid_thws
        grids = [(int(t), int(h), int(w)) for t, h, w in rows]
        kh, kw = self.mm_projector.merge_kernel_size
        patch = self.config.patch_size
        for t, h, w in grids:
            assert h % kh == 0 and w % kw == 0, f"grid {(t, h, w)} not divisible by {(kh, kw)}"
            assert 1 <= t <= self.config.init_pos_emb_time, f"grid {(t, h, w)}: too many frames"
        total = sum(t * h * w for t, h, w in grids)
        expected = (total, 3, patch, patch)
        assert tuple(pixel_values.shape) == expected, f"pixel_values {pixel_values.shape}"
        return grids


def _check_supported(config: VisionConfig) -> None:
    supported = {
        "pos_emb_type": "divided_fixed",
        "merge_type": "sd2_tpool",
        "mm_projector_type": "patchmerger",
        "projector_hidden_act": "gelu",
        "video_attn_type": "spatial_temporal",
    }
    for field, value in supported.items():
        if getattr(config, field) != value:
            raise ValueError(f"vision_config.{field}={getattr(config, field)!r} is not supported")
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size or head_dim % 4:
        raise ValueError(f"vision head dim {head_dim} must divide hidden and be a multiple of 4")


def load_vision_model(
    model_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> KimiVisionModel:
    """Builds the vision tower and projector and fills them from the checkpoint.

    Raises ValueError when the checkpoint has no vision config, lacks a vision tensor, holds a
    `vision_tower.*` / `mm_projector.*` tensor the model does not have, or a shape differs.
    """
    config = ModelConfig.from_dir(model_path)
    if config.vision is None:
        raise ValueError(f"{model_path}: config.json has no vision_config")
    with torch.device("meta"):
        model = KimiVisionModel(config.vision)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in checkpoint_files(model_path):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.startswith(VISION_PREFIXES):
                    _assign(model, params, name, f.get_tensor(name).to(device, dtype))
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} vision tensors, e.g. {missing[:5]}")
    logger.info("loaded vision model from %s (%d tensors)", model_path, len(loaded))
    return model.eval()


def _assign(
    model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor
) -> None:
    if name not in params:
        raise ValueError(f"unexpected vision tensor in checkpoint: {name}")
    if tuple(tensor.shape) != tuple(params[name].shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {params[name].shape}")
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def splice_image_embeds(
    token_embeds: torch.Tensor,
    token_ids: Sequence[int],
    image_embeds: Sequence[torch.Tensor],
    placeholder_id: int,
) -> torch.Tensor:
    """token_embeds [T, E] with the rows of placeholder tokens replaced, in prompt order, by the
    rows of `image_embeds` (one [N_i, E] per image, in prompt order). Returns a new tensor.

    Raises ValueError when the number of placeholders differs from the total of the N_i."""
    ids = torch.as_tensor(list(token_ids), device=token_embeds.device)
    positions = (ids == placeholder_id).nonzero().squeeze(1)  # [sum N_i]
    num_rows = sum(e.shape[0] for e in image_embeds)
    if positions.numel() != num_rows:
        raise ValueError(f"{positions.numel()} image placeholders but {num_rows} image embeddings")
    out = token_embeds.clone()
    if num_rows:
        out[positions] = torch.cat(list(image_embeds)).to(out.device, out.dtype)
    return out
