"""INT4 pack-quantized format checked against compressed-tensors and a hand-worked example."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import quantize

from shared.quant import dequantize_int4, pack_int4, quantize_int4, unpack_int4

ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
SCHEME = QuantizationScheme(targets=["Linear"], weights=ARGS)


def _random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * 0.05


@pytest.mark.parametrize("shape", [(64, 128), (7, 32), (48, 224)])
def test_layout_and_dtypes(shape):
    packed, scale, weight_shape = quantize_int4(_random_weight(*shape, seed=1))
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert scale.dtype == torch.bfloat16 and scale.shape == (shape[0], shape[1] // 32)
    assert weight_shape.dtype == torch.int32 and weight_shape.tolist() == list(shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_compressed_tensors(seed):
    weight = _random_weight(96, 256, seed)
    packed, scale, shape = quantize_int4(weight)

    # Same integers as compressed-tensors' own unpacker, and the same packed words.
    q_ref = unpack_from_int32(packed, 4, torch.Size(shape.tolist()))
    assert torch.equal(unpack_int4(packed, 256), q_ref)
    assert torch.equal(pack_to_int32(q_ref, 4), packed)
    assert int(q_ref.min()) == -8 and int(q_ref.max()) == 7

    # Same rounding as compressed-tensors' quantizer given our scales.
    assert torch.equal(quantize(weight, scale, None, ARGS, dtype=torch.int8), q_ref)

    # Same weight as compressed-tensors' full decompression (which returns bf16).
    state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": shape}
    ref = PackedQuantizationCompressor.decompress(state, SCHEME)["weight"]
    assert torch.equal(dequantize_int4(packed, scale, shape, torch.bfloat16), ref)
    expected = q_ref.float() * scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(dequantize_int4(packed, scale, shape, torch.float32), expected)


def test_quantization_error_is_half_a_step():
    weight = _random_weight(32, 128, seed=3)
    packed, scale, shape = quantize_int4(weight)
    error = (dequantize_int4(packed, scale, shape, torch.float32) - weight).abs()
    step = scale.float().repeat_interleave(32, dim=1)
    # Half a step, plus the clamp at 7 when bf16 rounding (relative 2**-8) shrinks the scale.
    assert bool((error <= step * (0.5 + 7.5 * 2**-8) + 1e-8).all())


def test_hand_worked_example():
    # One row, 32 columns (one group). Columns 0..7 hold q = -8..-1, columns 8..15 hold 0..7,
    # the rest are 0. Stored nibbles are q + 8, column 8j + k in bits 4k..4k+3 of word j:
    #   word 0 = 0x76543210, word 1 = 0xFEDCBA98 (as int32: -19088744), words 2..3 = 0x88888888.
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, :16] = torch.arange(-8, 8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x76543210, -19088744, -2004318072, -2004318072]]
    assert 0xFEDCBA98 - 2**32 == -19088744 and 0x88888888 - 2**32 == -2004318072

    scale = torch.tensor([[0.5]], dtype=torch.bfloat16)
    weight = dequantize_int4(packed, scale, (1, 32), torch.float32)
    assert weight[0, :16].tolist() == [v * 0.5 for v in range(-8, 8)]
    assert weight[0, 16:].tolist() == [0.0] * 16


def test_hand_worked_quantize():
    # Group max |w| = 3.0 gives scale 3.0 / 7.5 = 0.4 (bf16: 0.400390625).
    weight = torch.zeros(1, 32)
    weight[0, 0], weight[0, 1], weight[0, 2], weight[0, 3] = 3.0, -3.0, 0.41, -0.19
    packed, scale, _ = quantize_int4(weight)
    assert scale.item() == pytest.approx(0.400390625)
    q = unpack_int4(packed, 32)
    # 3.0 / 0.4004 = 7.49 -> 7; -7.49 -> -7; 1.02 -> 1; -0.47 -> 0.
    assert q[0, :4].tolist() == [7, -7, 1, 0]
