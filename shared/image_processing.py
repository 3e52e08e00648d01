"""Image bytes to MoonViT inputs: safe decoding, K2.5's NaViT resize, normalisation, patches.

The router counts an image's placeholder tokens from its size alone (`probe_image_size`, then
`num_image_tokens`); the vision worker decodes and patchifies (`decode_image`, then
`preprocess_image`). Both read the same `ImageProcessingConfig`, so the count always equals the
number of embeddings the encoder returns.

Decoding decisions (all bad input raises `ImageError`, a `ValueError`, never anything else):
- Accepted formats: PNG, JPEG (incl. MPO from phone cameras), WEBP, GIF and BMP; anything else
  (PPM, TIFF, random bytes) is rejected as "not a supported image". Animated images use their
  first frame.
- The EXIF orientation found in the header is applied, so width and height are those a viewer
  shows.
- Transparency (RGBA, LA, PA, or a palette / grayscale transparency index) is composited over
  white, as transformers' `convert_to_rgb` does for Kimi-K2.5; grayscale is replicated to three
  channels; CMYK goes through Pillow's conversion.
- 16-bit grayscale is scaled to 8 bits (v / 257). Pillow's own conversion clips it at 255 and
  turns almost every 16-bit image white, so here we deliberately differ from transformers.
- Images with more than `max_pixels` pixels are rejected from their header, before decoding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.settings import DEFAULT_MAX_PIXELS

# Pillow format names; "JPEG" also opens the MPO files of phone cameras.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as `ImageOps.exif_transpose`).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(ValueError):
    """An image the server cannot use: not an image, unsupported, truncated, corrupt or too large.

    The message names the problem and is safe to return to the client (400)."""


@dataclasses.dataclass(frozen=True)
class ImageProcessingConfig:
    """The image part of `media_proc_cfg` in the checkpoint's `preprocessor_config.json`."""

    patch_size: int = 14
    merge_kernel_size: int = 2
    in_patch_limit: int = 16384
    patch_limit_on_one_side: int = 512
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dir(cls, model_path: str | Path) -> ImageProcessingConfig:
        raw = json.loads((Path(model_path) / "preprocessor_config.json").read_text())
        return cls.from_dict(raw.get("media_proc_cfg", raw))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessingConfig:
        if raw.get("fixed_output_tokens") is not None:
            raise ValueError("media_proc_cfg.fixed_output_tokens is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def pad_multiple(self) -> int:
        return self.patch_size * self.merge_kernel_size

    @property
    def max_side(self) -> int:
        return self.patch_limit_on_one_side * self.patch_size


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """Encoder input for one image: `pixel_values` [L, 3, P, P] float32 and its patch grid."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int


# ---------------------------------------------------------------- size arithmetic (no pixels)


def resized_size(width: int, height: int, cfg: ImageProcessingConfig) -> tuple[int, int]:
    """K2.5's NaViT resize: the largest size within the patch budgets, never upscaled."""
    patch = cfg.patch_size
    num_patches = max(1, width // patch) * max(1, height // patch)
    scale = min(
        1.0,
        math.sqrt(cfg.in_patch_limit / num_patches),
        cfg.max_side / width,
        cfg.max_side / height,
    )
    new_width = min(max(1, int(width * scale)), cfg.max_side)
    new_height = min(max(1, int(height * scale)), cfg.max_side)
    return new_width, new_height


def padded_size(width: int, height: int, cfg: ImageProcessingConfig) -> tuple[int, int]:
    """The resized size padded up to multiples of patch_size * merge_kernel_size."""
    multiple = cfg.pad_multiple
    new_width, new_height = resized_size(width, height, cfg)
    return -(-new_width // multiple) * multiple, -(-new_height // multiple) * multiple


def num_image_tokens(width: int, height: int, cfg: ImageProcessingConfig) -> int:
    """Placeholder tokens (encoder outputs) for an image of this displayed size."""
    padded_width, padded_height = padded_size(width, height, cfg)
    merged = cfg.pad_multiple
    return (padded_width // merged) * (padded_height // merged)


# ---------------------------------------------------------------- decoding


def probe_image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read without decoding pixels.

    Raises `ImageError` for anything `decode_image` would reject before decoding."""
    image = _open(data, max_pixels)
    width, height = image.size
    if _orientation(image) in _SWAPPED_ORIENTATIONS:
        return height, width
    return width, height


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes encoded image bytes to an upright 8-bit RGB image (see the module docstring)."""
    image = _open(data, max_pixels)
    orientation = _orientation(image)
    try:
        image.load()
        upright = image.transpose(_TRANSPOSES[orientation]) if orientation in _TRANSPOSES else image
        return to_rgb(upright)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many kinds of error on bad input
        if "truncated" in str(exc).lower():
            raise ImageError("truncated image: the file ends before its pixel data") from exc
        raise ImageError(f"corrupt {image.format} image: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited over white, 16-bit grayscale scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = _sixteen_bit_to_l(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty image data")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        names = ", ".join(SUPPORTED_FORMATS)
        raise ImageError(f"not a supported image (expected one of {names})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's header parsers raise many kinds of error on bad input
        raise ImageError(f"truncated or corrupt image header: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height} pixels, "
            f"the limit is {max_pixels}"
        )
    return image


def _orientation(image: Image.Image) -> int:
    # Only EXIF found in the header counts (JPEG APP1, WEBP, PNG eXIf before IDAT): Pillow's
    # `getexif()` would decode a PNG's pixels looking for a trailing chunk, and the size probe
    # must see the same orientation as the decoder.
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is ignored, as viewers do
        return 1


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.int64)
    scaled = np.clip((values * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    converted = Image.fromarray(scaled, mode="L")
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        converted = Image.merge("LA", (converted, Image.fromarray(alpha, mode="L")))
    return converted


# ---------------------------------------------------------------- pixels to patches


def preprocess_image(image: Image.Image, cfg: ImageProcessingConfig) -> ProcessedImage:
    """Resize (bicubic), pad with black, normalise and cut into row-major patches."""
    image = image if image.mode == "RGB" else to_rgb(image)
    new_size = resized_size(image.width, image.height, cfg)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    padded_width, padded_height = padded_size(image.width, image.height, cfg)
    pixels = np.zeros((padded_height, padded_width, 3), dtype=np.uint8)  # black padding
    pixels[: image.height, : image.width] = np.asarray(image)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0  # [3, H', W']
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    x = (x - mean) / std
    patch = cfg.patch_size
    grid_h, grid_w = padded_height // patch, padded_width // patch
    x = x.view(3, grid_h, patch, grid_w, patch).permute(1, 3, 0, 2, 4)  # [gh, gw, 3, P, P]
    pixel_values = x.reshape(grid_h * grid_w, 3, patch, patch).contiguous()  # [L, 3, P, P]
    merge = cfg.merge_kernel_size
    num_tokens = (grid_h // merge) * (grid_w // merge)
    return ProcessedImage(pixel_values, (1, grid_h, grid_w), num_tokens)


def process_image_bytes(
    data: bytes, cfg: ImageProcessingConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ProcessedImage:
    """`decode_image` then `preprocess_image`."""
    return preprocess_image(decode_image(data, max_pixels), cfg)
