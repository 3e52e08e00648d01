"""Small building blocks of the text model: RMSNorm, SwiGLU MLP, YaRN rotary embedding.

Shape letters: T tokens in the batch, H heads, R rope dims (`qk_rope_head_dim`), D hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import RopeScalingConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale (the reference order).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`, no biases: the dense MLP, each expert, the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def yarn_inv_freq(rope_dim: int, theta: float, scaling: RopeScalingConfig | None) -> torch.Tensor:
    """Per-pair rotation frequencies [R/2], blending interpolation and extrapolation (YaRN)."""
    freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if scaling is None or scaling.factor <= 1:
        return freq

    def correction_dim(num_rotations: float) -> float:
        ratio = scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi)
        return rope_dim * math.log(ratio) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero, as the reference does
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return (freq / scaling.factor) * (1 - extrapolation_weight) + freq * extrapolation_weight


class RotaryEmbedding(nn.Module):
    """Rotates adjacent pairs (x[2i], x[2i+1]) by `position * inv_freq[i]` (DeepSeek's layout)."""

    def __init__(self, rope_dim: int, theta: float, scaling: RopeScalingConfig | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", yarn_inv_freq(rope_dim, theta, scaling), persistent=False)
        self.magnitude = 1.0
        if scaling is not None and scaling.factor > 1:
            self.magnitude = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
                scaling.factor, scaling.mscale_all_dim
            )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., R]; positions: [T]. Returns x rotated, same shape and dtype."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        shape = (angles.shape[0], *([1] * (x.dim() - 2)), angles.shape[1])  # [T, 1.., R/2]
        cos = (angles.cos() * self.magnitude).view(shape)
        sin = (angles.sin() * self.magnitude).view_as(cos)
        pairs = x.float().unflatten(-1, (-1, 2))  # [T, ..., R/2, 2]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
