"""The vision engine: decodes images on the callers' threads, encodes them in packed batches.

`encode` (called from gRPC handler threads) answers images already in the cache at once (a hit,
pinned for the request), decodes and patchifies the others on the caller's thread and queues
them. The engine loop takes every queued image up to `max_batch_patches` patches, from any
number of requests, and runs MoonViT once over them packed one after another. An image whose
hash appears twice in a batch, or that an earlier batch stored meanwhile, is encoded once; the
other copies count as hits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import torch
from PIL import Image

from shared.image_processing import (
    ImageError,
    ImageProcessingConfig,
    ProcessedImage,
    preprocess_image,
    process_image_bytes,
)
from shared.model.vision import KimiVisionModel
from vision_worker.cache import EmbeddingCache

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """8-bit RGB pixels, row-major (`rgb` holds width * height * 3 bytes)."""

    width: int
    height: int
    rgb: bytes


ImageInput = bytes | DecodedImage


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    """One image's outcome: its handle (content hash, token count) or why it cannot be used."""

    content_hash: str = ""
    num_tokens: int = 0
    error: str = ""


@dataclasses.dataclass
class _Job:
    key: str
    request_id: str
    image: ProcessedImage
    future: Future = dataclasses.field(default_factory=Future)

    @property
    def num_patches(self) -> int:
        return self.image.pixel_values.shape[0]


def content_hash(image: ImageInput) -> str:
    """Hex SHA-256 of the encoded bytes, or of the size and pixels of a decoded image."""
    if isinstance(image, DecodedImage):
        digest = hashlib.sha256(f"rgb8 {image.width}x{image.height}\n".encode())
        digest.update(image.rgb)
        return digest.hexdigest()
    return hashlib.sha256(image).hexdigest()


class VisionEngine:
    def __init__(
        self,
        model: KimiVisionModel,
        image_config: ImageProcessingConfig,
        cache: EmbeddingCache,
        max_batch_patches: int,
        max_pixels: int,
    ) -> None:
        self.model = model
        self.image_config = image_config
        self.cache = cache
        self.max_batch_patches = max_batch_patches
        self.max_pixels = max_pixels
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._pending: list[_Job] = []
        self.num_running = 0  # images in the encoder pass now (read by heartbeats)
        self._thread = threading.Thread(target=self._loop, name="vision-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return self._jobs.qsize() + len(self._pending)

    def encode(self, request_id: str, images: Sequence[ImageInput]) -> list[EncodeResult]:
        """Handles of `images`, in order, each pinned for `request_id`; blocks until encoded.

        A bad image gets an `EncodeResult` with `error` and does not fail the others; a failed
        encoder pass raises."""
        results: list[EncodeResult | None] = []
        waiting: list[tuple[int, _Job]] = []
        for image in images:
            key = content_hash(image)
            cached = self.cache.pin(key, request_id)
            if cached is not None:
                results.append(EncodeResult(key, cached.shape[0]))
                continue
            try:
                processed = self._preprocess(image)
            except ImageError as exc:
                results.append(EncodeResult(key, error=str(exc)))
                continue
            job = _Job(key, request_id, processed)
            self._jobs.put(job)
            waiting.append((len(results), job))
            results.append(None)
        for index, job in waiting:
            job.future.result()
            results[index] = EncodeResult(job.key, job.image.num_tokens)
        return results

    def _preprocess(self, image: ImageInput) -> ProcessedImage:
        if not isinstance(image, DecodedImage):
            return process_image_bytes(image, self.image_config, self.max_pixels)
        width, height = image.width, image.height
        if width < 1 or height < 1 or len(image.rgb) != width * height * 3:
            raise ImageError(f"decoded image of {width}x{height} needs {width * height * 3} "
                             f"bytes of RGB, got {len(image.rgb)}")  # fmt: skip
        if width * height > self.max_pixels:
            raise ImageError(f"image too large: {width}x{height} = {width * height} pixels, "
                             f"the limit is {self.max_pixels}")  # fmt: skip
        return preprocess_image(Image.frombytes("RGB", (width, height), image.rgb),
                                self.image_config)  # fmt: skip

    # ------------------------------------------------------------ engine loop

    def _take_batch(self) -> list[_Job]:
        """Queued jobs in arrival order, up to `max_batch_patches` (at least one job)."""
        if not self._pending:
            self._pending.append(self._jobs.get())
        while not self._jobs.empty():
            self._pending.append(self._jobs.get_nowait())
        batch, num_patches = [], 0
        for job in list(self._pending):
            if batch and num_patches + job.num_patches > self.max_batch_patches:
                break
            self._pending.remove(job)
            batch.append(job)
            num_patches += job.num_patches
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            self.num_running = len(batch)
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch fails its images, not the worker
                logger.exception("vision batch of %d images failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            self.num_running = 0

    def _run(self, batch: list[_Job]) -> None:
        unique: dict[str, _Job] = {}
        copies: list[_Job] = []
        for job in batch:
            if job.key in unique:
                copies.append(job)
            elif self.cache.pin(job.key, job.request_id) is not None:  # stored by an earlier batch
                job.future.set_result(None)
            else:
                unique[job.key] = job
        if unique:
            jobs = list(unique.values())
            pixels = torch.cat([job.image.pixel_values for job in jobs])  # [L, 3, P, P]
            embeds = self.model.encode(pixels, [job.image.grid_thw for job in jobs])
            for job, rows in zip(jobs, embeds):
                self.cache.put(job.key, rows.clone(), job.request_id)  # [N, E], own storage
                job.future.set_result(None)
            logger.debug("encoded %d images (%d patches)", len(jobs), pixels.shape[0])
        for job in copies:
            self.cache.pin(job.key, job.request_id)
            job.future.set_result(None)
