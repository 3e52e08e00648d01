"""INT4 weights in compressed-tensors `pack-quantized` format (Kimi-K2.5 routed experts).

Format (symmetric, group-wise, no zero point):

* `weight_packed` int32 [out, in/8]: nibble k (bits 4k..4k+3, k = 0 least significant) of column j
  holds input column 8j + k as the unsigned value q + 8, with q in [-8, 7].
* `weight_scale` bf16 [out, in/32]: one scale per group of 32 consecutive input columns.
* `weight_shape` int32 [2]: the original [out, in].

The dequantized weight is `q[o, i] * weight_scale[o, i // 32]`.
"""

from __future__ import annotations

import torch

NUM_BITS = 4
GROUP_SIZE = 32
PACK_FACTOR = 32 // NUM_BITS  # int4 values per int32
Q_MIN, Q_MAX = -8, 7
_OFFSET = 8
_SHIFTS = torch.arange(PACK_FACTOR, dtype=torch.int64) * NUM_BITS  # [8]


def quantize_int4(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [out, in] to `(weight_packed, weight_scale, weight_shape)`.

    The scale of a group is its absolute maximum divided by 7.5 (the min-max observer of
    compressed-tensors), rounded to bf16; values are then rounded to nearest with that bf16 scale
    and clamped to [-8, 7]. `in` must be a multiple of `group_size` (32 in the release).
    """
    assert weight.dim() == 2, f"expected a 2-D weight, got shape {tuple(weight.shape)}"
    out_features, in_features = weight.shape
    assert in_features % group_size == 0, f"in={in_features} is not a multiple of {group_size}"
    assert group_size % PACK_FACTOR == 0, f"group_size={group_size} must be a multiple of 8"

    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    absmax = groups.abs().amax(dim=-1)  # [out, groups]
    scale = (absmax / ((Q_MAX - Q_MIN) / 2)).clamp_min(torch.finfo(torch.bfloat16).tiny)
    scale = scale.to(torch.bfloat16)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp_(Q_MIN, Q_MAX)
    q = q.reshape(out_features, in_features).to(torch.int64)

    shape = torch.tensor([out_features, in_features], dtype=torch.int32)
    return pack_int4(q), scale, shape


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values `q` [out, in] (any integer dtype, in % 8 == 0) into int32 [out, in/8]."""
    out_features, in_features = q.shape
    assert in_features % PACK_FACTOR == 0, f"in={in_features} is not a multiple of {PACK_FACTOR}"
    assert int(q.min()) >= Q_MIN and int(q.max()) <= Q_MAX, "values outside the int4 range"
    nibbles = (q.to(torch.int64) + _OFFSET).reshape(out_features, -1, PACK_FACTOR)
    words = (nibbles << _SHIFTS).sum(dim=-1)  # [out, in/8], in [0, 2**32)
    # Reinterpret the unsigned 32-bit pattern as a signed int32.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Unpack int32 [out, in/8] into signed int4 values as int8 [out, num_columns]."""
    assert packed.dtype == torch.int32, f"expected int32, got {packed.dtype}"
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [out, in/8]
    nibbles = (words.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [out, in/8, 8]
    q = nibbles.reshape(packed.shape[0], -1)[:, :num_columns] - _OFFSET
    return q.to(torch.int8)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: torch.Tensor | tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Rebuild the weight [out, in] from its packed form, computed in fp32 and cast to `dtype`."""
    out_features, in_features = (int(v) for v in shape)
    assert packed.shape[0] == out_features, f"packed rows {packed.shape[0]} != {out_features}"
    q = unpack_int4(packed, in_features).float()  # [out, in]
    group_size = in_features // scale.shape[1]
    assert group_size * scale.shape[1] == in_features, (
        f"scale columns {scale.shape[1]} do not divide in={in_features}"
    )
    full_scale = scale.float().repeat_interleave(group_size, dim=1)  # [out, in]
    return (q * full_scale).to(dtype)
