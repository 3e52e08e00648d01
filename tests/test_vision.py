"""Image preprocessing and the vision model against transformers' Kimi-K2.5 on the tiny checkpoint.

transformers' `Kimi_K25ImageProcessor` class needs torchvision, which the CPU environment does
not have (the PyPI torchvision wheel does not load against the CPU torch build). The token count
reference is therefore the processor's own `navit_resize` function and class defaults, read from
transformers' source: both `get_number_of_image_patches` and `_preprocess` size images with them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import math
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_reference import load_hf_model
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from shared.checkpoint import NUM_BASE_TOKENS
from shared.config import ModelConfig
from shared.image_processing import (
    ImageError,
    ImageProcessingConfig,
    decode_image,
    num_image_tokens,
    preprocess_image,
    probe_image_size,
    process_image_bytes,
)

MAX_EMBED_DIFF = 1e-4
MAX_LOGIT_DIFF = 1e-4
# (width, height) of the random test images: grids 4x6, 8x10 and 4x100 patches (the last one
# resamples the 64x64 position table up along one side and down along the other).
IMAGE_SIZES = ((84, 56), (140, 110), (1400, 56))


def _encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------- transformers' count


def _hf_processor_source() -> tuple[Any, dict[str, Any]]:
    """transformers' `navit_resize` and the processor's class defaults, from its source."""
    spec = importlib.util.find_spec("transformers.models.kimi_k25.image_processing_kimi_k25")
    tree = ast.parse(Path(spec.origin).read_text())
    function = next(n for n in tree.body if getattr(n, "name", "") == "navit_resize")
    namespace: dict[str, Any] = {"math": math}
    exec(compile(ast.Module([function], []), spec.origin, "exec"), namespace)
    processor = next(n for n in tree.body if getattr(n, "name", "") == "Kimi_K25ImageProcessor")
    defaults = {}
    for node in processor.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):  # names such as IMAGENET_STANDARD_MEAN
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return namespace["navit_resize"], defaults


def hf_num_image_tokens(width: int, height: int) -> int:
    """`Kimi_K25ImageProcessor.get_number_of_image_patches(height, width) // merge_size**2`."""
    navit_resize, defaults = _hf_processor_source()
    _, (pad_height, pad_width) = navit_resize(
        height,
        width,
        patch_size=defaults["patch_size"],
        merge_kernel_size=defaults["merge_size"],
        max_patches=defaults["max_patches"],
        max_size_per_side=defaults["size"]["max_height"],
    )
    patches = (pad_height // defaults["patch_size"]) * (pad_width // defaults["patch_size"])
    return patches // defaults["merge_size"] ** 2


def test_checkpoint_media_config_matches_transformers_defaults(tiny_checkpoint):
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    cfg = ImageProcessingConfig.from_dir(tiny_checkpoint)
    _, defaults = _hf_processor_source()
    assert cfg.patch_size == defaults["patch_size"] == 14
    assert cfg.merge_kernel_size == defaults["merge_size"] == 2
    assert cfg.in_patch_limit == defaults["max_patches"] == 16384
    assert cfg.patch_limit_on_one_side == defaults["size"]["max_height"] == 512
    assert list(cfg.image_mean) == list(IMAGENET_STANDARD_MEAN)
    assert list(cfg.image_std) == list(IMAGENET_STANDARD_STD)


@pytest.mark.parametrize(
    "width,height", [(1, 1), (13, 13), (14, 14), (640, 480), (3000, 200), (4000, 4000)]
)
def test_placeholder_counts_match_transformers(tiny_checkpoint, width, height):
    cfg = ImageProcessingConfig.from_dir(tiny_checkpoint)
    expected = hf_num_image_tokens(width, height)
    assert num_image_tokens(width, height, cfg) == expected
    data = _encode(Image.new("RGB", (width, height), (90, 120, 150)), compress_level=1)
    assert probe_image_size(data) == (width, height)
    processed = process_image_bytes(data, cfg)
    t, gh, gw = processed.grid_thw
    assert processed.num_tokens == expected == t * gh * gw // 4
    assert processed.pixel_values.shape == (t * gh * gw, 3, 14, 14)


@pytest.mark.parametrize(
    "width,height,expected", [(2048, 1365, 3626), (17, 64, 3), (5000, 6000, 4189)]
)
def test_k32_image_token_counts_huge_normal_tiny(width, height, expected):
    cfg = ImageProcessingConfig()
    assert hf_num_image_tokens(width, height) == expected
    assert num_image_tokens(width, height, cfg) == expected
    data = _encode(Image.new("RGB", (width, height)), compress_level=1)
    assert process_image_bytes(data, cfg).num_tokens == expected


def test_preprocessing_pads_with_black_and_normalises():
    cfg = ImageProcessingConfig()
    image = Image.new("RGB", (30, 20), (255, 0, 51))
    processed = preprocess_image(image, cfg)
    assert processed.grid_thw == (1, 2, 4)  # padded to 56 x 28
    grid = processed.pixel_values.view(2, 4, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, 28, 56)
    assert torch.allclose(grid[:, :20, :30], torch.tensor([1.0, -1.0, -0.6]).view(3, 1, 1))
    assert bool((grid[:, 20:, :] == -1.0).all()) and bool((grid[:, :, 30:] == -1.0).all())


# ---------------------------------------------------------------- decoding (K33, K35, EXIF)


def _square(mode: str, background: Any, square: Any) -> Image.Image:
    image = Image.new(mode, (64, 64), background)
    image.paste(square, (10, 10, 20, 20))
    return image


def _k33_variant(name: str) -> bytes:
    if name == "RGBA":  # transparent pixels are red, so dropping alpha would show red
        return _encode(_square("RGBA", (255, 0, 0, 0), (0, 0, 0, 255)))
    if name == "LA":
        return _encode(_square("LA", (128, 0), (0, 255)))
    if name in ("P-png", "P-gif"):
        image = _square("P", 0, 1)
        image.putpalette([255, 0, 0, 0, 0, 0])  # index 0 red (transparent), 1 black
        return _encode(image, name[2:].upper(), transparency=0)
    if name == "L":
        return _encode(_square("L", 255, 0))  # replicated to (255, 255, 255) and (0, 0, 0)
    if name == "I;16":  # 16-bit grayscale: 65535 is white, not clipped
        pixels = np.full((64, 64), 65535, dtype=np.uint16)
        pixels[10:20, 10:20] = 0
        return _encode(Image.fromarray(pixels))
    assert name == "CMYK-jpeg"
    return _encode(_square("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "JPEG", quality=95)


@pytest.mark.parametrize("variant", ["RGBA", "LA", "P-png", "P-gif", "L", "I;16", "CMYK-jpeg"])
def test_k33_transparent_and_non_rgb_images(variant):
    image = decode_image(_k33_variant(variant))
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image).astype(int)
    tolerance = 8 if variant == "CMYK-jpeg" else 0
    outside = np.abs(pixels[40:, 40:] - 255).max()
    inside = np.abs(pixels[11:19, 11:19] - 0).max()
    assert outside <= tolerance, f"{variant}: background {pixels[50, 50]}"
    assert inside <= tolerance, f"{variant}: square {pixels[15, 15]}"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size in its header but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat, end = chunk(b"IDAT", zlib.compress(b"")), chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + end


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("ppm", _encode(_random_image(8, 8, 0), "PPM"), "not a supported image"),
        ("random", bytes(np.random.default_rng(5).integers(0, 256, 20, dtype=np.uint8)), "not a"),
        ("text", b"<html><body>404</body></html>", "not a supported image"),
        ("empty", b"", "empty image"),
        ("truncated", _encode(_random_image(64, 64, 1))[:3000], "truncated"),
        ("bomb", _png_header(100_000, 100_000), "too large"),
        ("over-limit", _png_header(9000, 9000), "too large"),
    ],
)
def test_k35_undecodable_or_unsupported_images(name, data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)
    if name != "truncated":  # the size probe reads headers only
        with pytest.raises(ImageError, match=message):
            probe_image_size(data)


def test_max_pixels_is_a_parameter():
    data = _encode(Image.new("RGB", (100, 50)))
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError, match="5000 pixels, the limit is 4999"):
        decode_image(data, max_pixels=4999)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated a quarter turn clockwise
    data = _encode(image, "JPEG", quality=95, exif=exif.tobytes())
    assert probe_image_size(data) == (20, 40)
    decoded = decode_image(data)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert decoded.size == (20, 40)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))
    assert np.asarray(decoded)[:15].mean() < 20 and np.asarray(decoded)[25:].mean() > 235


# ---------------------------------------------------------------- the vision model


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    model, info = load_hf_model(tiny_checkpoint, tmp_path_factory.mktemp("hf_vision_copy"))
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoint: Path):
    from shared.model.vision import load_vision_model

    return load_vision_model(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def text_model(tiny_checkpoint: Path):
    from shared.model.loader import load_text_model

    return load_text_model(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def images(tiny_checkpoint: Path):
    cfg = ImageProcessingConfig.from_dir(tiny_checkpoint)
    return [preprocess_image(_random_image(w, h, i), cfg) for i, (w, h) in enumerate(IMAGE_SIZES)]


def _batch(images) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.cat([p.pixel_values for p in images])
    return pixel_values, torch.tensor([p.grid_thw for p in images])


def _max_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    assert [o.shape for o in ours] == [r.shape for r in ref]
    return max(float((o - r).abs().max()) for o, r in zip(ours, ref))


def test_vision_embeddings_match_transformers(vision_model, hf_model, images):
    pixel_values, grids = _batch(images)
    ours = vision_model.encode(pixel_values, grids)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixel_values, grids).pooler_output
    assert [o.shape for o in ours] == [(p.num_tokens, 128) for p in images]
    assert all(0.1 < float(r.std()) < 10 for r in ref)  # O(1) features, not all zeros
    diff = _max_diff(ours, list(ref))
    assert diff <= MAX_EMBED_DIFF, f"max |diff| {diff:.3g}"


def test_video_chunk_matches_transformers(vision_model, hf_model):
    pixel_values = torch.randn(3 * 4 * 6, 3, 14, 14, generator=torch.Generator().manual_seed(3))
    grids = torch.tensor([[3, 4, 6]])  # three frames: temporal embedding and mean pooling
    ours = vision_model.encode(pixel_values, grids)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixel_values, grids).pooler_output
    assert ours[0].shape == (6, 128)
    assert _max_diff(ours, list(ref)) <= MAX_EMBED_DIFF


def test_packed_batch_equals_one_image_at_a_time(vision_model, images):
    batched = vision_model.encode(*_batch(images))
    single = [vision_model.encode(*_batch([p]))[0] for p in images]
    assert _max_diff(batched, single) <= 1e-5


def test_bfloat16_encode_stays_close(tiny_checkpoint, vision_model, images):
    from shared.model.vision import load_vision_model

    pixel_values, grids = _batch(images)
    ours = load_vision_model(tiny_checkpoint, dtype=torch.bfloat16).encode(pixel_values, grids)
    for low, full in zip(ours, vision_model.encode(pixel_values, grids)):
        assert low.dtype == torch.bfloat16
        assert float(torch.cosine_similarity(low.float(), full, dim=-1).min()) > 0.999


def _image_prompt(placeholder_id: int, counts: list[int]) -> list[int]:
    """Plain text ids around two runs of `counts[i]` placeholders."""
    gen = torch.Generator().manual_seed(7)
    text = [torch.randint(0, NUM_BASE_TOKENS, (n,), generator=gen).tolist() for n in (9, 5, 6)]
    return text[0] + [placeholder_id] * counts[0] + text[1] + [placeholder_id] * counts[1] + text[2]


def test_logits_with_two_images_match_transformers(
    tiny_checkpoint, vision_model, text_model, hf_model, images
):
    from shared.model.generate import reference_logits

    placeholder = ModelConfig.from_dir(tiny_checkpoint).media_placeholder_token_id
    prompt = _image_prompt(placeholder, [p.num_tokens for p in images[:2]])
    pixel_values, grids = _batch(images[:2])
    embeds = vision_model.encode(pixel_values, grids)
    ours = reference_logits(text_model, prompt, embeds, placeholder)
    inputs = {"input_ids": torch.tensor([prompt]), "pixel_values": pixel_values}
    with torch.no_grad():
        ref = hf_model(**inputs, image_grid_thw=grids, use_cache=False).logits[0]
    diff = float((ours - ref).abs().max())
    assert diff <= MAX_LOGIT_DIFF, f"max |diff| {diff:.3g}"
    # The images matter: the same prompt without them gives other logits after the first one.
    plain = reference_logits(text_model, prompt)
    assert float((plain - ours)[20:].abs().max()) > 0.1


def test_runner_mixes_embedding_and_token_steps(tiny_checkpoint, vision_model, text_model, images):
    from shared.model.generate import reference_logits
    from shared.model.vision import splice_image_embeds
    from shared.runner import ModelRunner, SeqStep

    placeholder = ModelConfig.from_dir(tiny_checkpoint).media_placeholder_token_id
    prompt = _image_prompt(placeholder, [images[0].num_tokens, 0])
    embeds = vision_model.encode(*_batch(images[:1]))
    model = text_model  # the short name keeps the steps below on one line each
    expected = reference_logits(model, prompt, embeds, placeholder)
    rows = splice_image_embeds(model.embed_tokens.weight[prompt], prompt, embeds, placeholder)
    plain = list(range(100, 111))
    runner = ModelRunner(model, num_pages=16, page_size=16)
    pages: list[list[int]] = [[], []]
    runner.ensure_pages(pages[0], len(prompt))
    runner.ensure_pages(pages[1], len(plain))
    # Chunked prefill of the image prompt (embeddings) next to a plain prompt (token ids).
    split = 12
    runner.run([SeqStep(prompt[:split], 0, pages[0], rows[:split])])
    logits = runner.run(
        [SeqStep(prompt[split:], split, pages[0], rows[split:]), SeqStep(plain, 0, pages[1])]
    )
    assert float((logits[0] - expected[-1]).abs().max()) <= 1e-5
    assert float((logits[1] - reference_logits(model, plain)[-1]).abs().max()) <= 1e-5


def test_splice_rejects_a_count_mismatch():
    from shared.model.vision import splice_image_embeds

    with pytest.raises(ValueError, match="3 image placeholders but 2 image embeddings"):
        splice_image_embeds(torch.zeros(5, 4), [1, 9, 9, 9, 2], [torch.ones(2, 4)], 9)


def test_loader_rejects_missing_and_unexpected_vision_tensors(tiny_checkpoint, tmp_path):
    from shared.model.vision import load_vision_model

    def broken_copy(edit) -> Path:
        out = tmp_path / edit.__name__
        shutil.copytree(tiny_checkpoint, out)
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        shard = out / weight_map["vision_tower.encoder.final_layernorm.weight"]
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return out

    def extra(tensors):
        tensors["vision_tower.encoder.blocks.0.extra.weight"] = torch.zeros(2)

    def missing(tensors):
        del tensors["vision_tower.encoder.final_layernorm.weight"]

    with pytest.raises(ValueError, match="unexpected vision tensor"):
        load_vision_model(broken_copy(extra))
    with pytest.raises(ValueError, match="lacks 1 vision tensors"):
        load_vision_model(broken_copy(missing))
