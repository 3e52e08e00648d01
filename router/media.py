"""Image inputs in the router: collect, load, count, encode (DESIGN.md sections 3 and 4).

1. `MediaResolver.expand` collects the request's image parts in prompt order
   (`messages[i].content[j]`), loads each one (`data:` URLs decoded here, `http(s)` URLs fetched
   under the address policy of `media_fetch.py`), probes its size from the header (the
   decompression-bomb check included), and expands the image's one `<|media_pad|>` in the
   prompt ids to `num_image_tokens` copies.
2. `MediaResolver.encode`, once the prompt passed the context-length check, has one vision
   worker encode the images and puts the handles on the prompt (`Prompt.images`); the prefill
   worker fetches the embeddings with them, so they never pass through the router.
3. `MediaResolver.release`, when the request ends, lets the vision worker evict them. Until
   then the request counts in the worker's `num_pinned`, so draining the worker (scaling the
   vision pool down) waits for it: the prefill worker can still fetch what it was promised.

A problem with an image is a `MediaError` (HTTP 400) naming the content part; a missing or
failing vision worker is a `SampleError` (503 or 500). A vision worker that cannot be reached
leaves the rotation and the images go to another one, once; a prefill worker that cannot fetch
the embeddings any more has the router encode them again (`encode_again`) before its retry.

Data URLs: `data:[<media type>][;base64],<data>`. A media type other than `image/*` (or none, or
`application/octet-stream`) is refused. In base64, whitespace is ignored (the Kimi-K2.5 model
card's own example puts a space after the comma), the URL-safe alphabet is accepted and missing
padding is restored; anything else that is not base64 is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

import grpc

from proto import kimiserve_pb2 as pb
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc
from router import metrics
from router.lifecycle import SampleError, mark_if_lost
from router.media_fetch import MediaError, UrlFetcher
from router.pools import Pool, Worker
from router.prompt import Prompt
from shared.config import ModelConfig
from shared.image_processing import (
    ImageError,
    ImageProcessingConfig,
    num_image_tokens,
    probe_image_size,
)
from shared.settings import MediaConfig, add_dataclass_flags, config_from_args

__all__ = ["MediaError", "MediaResolver", "expand_placeholders", "image_parts"]

logger = logging.getLogger(__name__)

# Image bytes per Encode call, well under the gRPC message limit; more go in parallel calls.
MAX_ENCODE_BYTES = 32 * 1024 * 1024
ENCODE_TIMEOUT_S = 600.0  # a safety net; a client that gives up cancels the call sooner
_UNTYPED = ("", "application/octet-stream")
_URLSAFE = str.maketrans("-_", "+/")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    param: str  # the content part, e.g. "messages[0].content[1]"
    data: bytes
    num_tokens: int


def image_parts(messages: Sequence[pb.ChatMessage]) -> list[tuple[str, str]]:
    """(param, URL) of every image part, in prompt order (the template's order)."""
    return [
        (f"messages[{i}].content[{j}]", part.image_url)
        for i, message in enumerate(messages)
        if not message.HasField("content")
        for j, part in enumerate(message.parts)
        if part.type != "text"
    ]


def expand_placeholders(token_ids: Sequence[int], counts: Sequence[int], pad_id: int) -> list[int]:
    """The ids with the k-th `pad_id` repeated `counts[k]` times."""
    positions = [i for i, t in enumerate(token_ids) if t == pad_id]
    if len(positions) != len(counts):
        raise MediaError(f"the prompt has {len(positions)} image placeholders for "
                         f"{len(counts)} images", "messages")  # fmt: skip
    out: list[int] = []
    start = 0
    for position, count in zip(positions, counts):
        out += token_ids[start:position]
        out += [pad_id] * count
        start = position + 1
    return out + list(token_ids[start:])


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:` URL (see the module docstring); raises `MediaError`."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError("the data URL has no ',' before its data")
    params = [p.strip().lower() for p in header.split(";")]
    if params[0] not in _UNTYPED and not params[0].startswith("image/"):
        raise MediaError(f"the data URL's media type {params[0]!r} is not an image")
    if "base64" not in params[1:]:
        data = unquote_to_bytes(payload)
    else:
        text = "".join(payload.split()).translate(_URLSAFE)
        if len(text) * 3 // 4 > max_bytes + 3:
            raise MediaError(f"the image is larger than {max_bytes} bytes")
        if bad := _NOT_BASE64.search(text):
            raise MediaError(f"the data URL is not valid base64: it contains {bad.group()!r}")
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error as exc:
            raise MediaError(f"the data URL is not valid base64 ({exc})") from exc
    if len(data) > max_bytes:
        raise MediaError(f"the image is larger than {max_bytes} bytes")
    return data


class MediaResolver:
    def __init__(self, config: MediaConfig, image_config: ImageProcessingConfig | None,
                 pad_id: int, vision: Pool, fetcher: UrlFetcher | None = None) -> None:  # fmt: skip
        self.config = config
        self.image_config = image_config  # None: the model takes no images
        self.pad_id = pad_id
        self.vision = vision
        self.fetcher = fetcher or UrlFetcher(config)
        self._releases: set[asyncio.Task] = set()
        self._pinned: dict[str, list[Worker]] = {}  # request_id -> workers holding its images

    @classmethod
    def from_model(cls, model_path: str, config: MediaConfig, vision: Pool) -> MediaResolver:
        model = ModelConfig.from_dir(model_path)
        has_images = model.vision is not None
        image_config = ImageProcessingConfig.from_dir(model_path) if has_images else None
        return cls(config, image_config, model.media_placeholder_token_id, vision)

    async def expand(self, request: pb.GenerateRequest,
                     prompt: Prompt) -> tuple[Prompt, list[LoadedImage]]:  # fmt: skip
        """The prompt with each image's placeholder expanded, and the loaded images in order."""
        parts = image_parts(request.messages)
        if not parts:
            return prompt, []
        images = await self.load(parts)
        counts = [image.num_tokens for image in images]
        ids = expand_placeholders(prompt.token_ids, counts, self.pad_id)
        return dataclasses.replace(prompt, token_ids=ids), images

    async def load(self, parts: Sequence[tuple[str, str]]) -> list[LoadedImage]:
        """Each (param, URL) loaded and counted; the first failing part, in order, raises."""
        if self.image_config is None:
            raise MediaError("this model does not accept images", parts[0][0])
        limit = self.config.max_images_per_request
        if len(parts) > limit:
            message = (f"the request has {len(parts)} images; this server accepts at most {limit} "
                       "per request (max_images_per_request)")  # fmt: skip
            raise MediaError(message, "messages")
        loaded = await asyncio.gather(*(self._load(p, u) for p, u in parts), return_exceptions=True)
        for result in loaded:
            if isinstance(result, BaseException):
                raise result
        return list(loaded)

    async def _load(self, param: str, url: str) -> LoadedImage:
        try:
            if url[:5].lower() == "data:":
                data = decode_data_url(url, self.config.max_image_bytes)
            else:  # the fetcher refuses schemes other than http and https
                data = await self.fetcher.fetch(url)
            width, height = probe_image_size(data, self.config.max_image_pixels)
        except (MediaError, ImageError) as exc:
            raise MediaError(f"{param}: {exc}", param) from exc
        return LoadedImage(param, data, num_image_tokens(width, height, self.image_config))

    async def encode(self, request_id: str, prompt: Prompt, images: Sequence[LoadedImage],
                     exclude: frozenset[str] = frozenset()) -> Prompt:  # fmt: skip
        """The prompt with the handles of its images, which one vision worker now holds until
        `release`. A worker lost during the call is replaced by another one, once."""
        if not images:
            return prompt
        for attempt in range(2):
            worker = self.vision.pick(exclude=exclude)
            if worker is None:
                raise SampleError("no vision worker is available; retry later", 503, 1)
            try:
                refs = await self._encode_with(worker, request_id, images)
            except SampleError as exc:
                if attempt or not exc.retryable:
                    raise
                logger.warning("request %s lost vision worker %s (%s); encoding elsewhere",
                               request_id, worker.worker_id, exc)  # fmt: skip
                exclude |= {worker.worker_id}
                continue
            pinned = self._pinned.setdefault(request_id, [])
            if worker not in pinned:  # one Release drops all of the request's pins there
                pinned.append(worker)
                worker.num_pinned += 1
            return dataclasses.replace(prompt, images=refs)
        raise AssertionError("unreachable")

    async def encode_again(self, request_id: str, prompt: Prompt,
                           images: Sequence[LoadedImage]) -> Prompt:  # fmt: skip
        """The prompt with fresh handles, preferring another vision worker than the one whose
        embeddings a prefill worker could not fetch (it died, or restarted with an empty cache)."""
        old = prompt.images.vision_address if prompt.images is not None else ""
        exclude = frozenset(w.worker_id for w in self.vision.workers if w.address == old)
        return await self.encode(request_id, dataclasses.replace(prompt, images=None), images,
                                 exclude)  # fmt: skip

    def release(self, request_id: str) -> None:
        """Unpins the request's images on every vision worker that encoded them (background)."""
        for worker in self._pinned.pop(request_id, []):
            worker.num_pinned -= 1
            self._release_on(worker, request_id)

    async def _encode_with(self, worker: Worker, request_id: str,
                           images: Sequence[LoadedImage]) -> vpb.ImageRefs:  # fmt: skip
        worker.num_inflight += 1
        worker.num_served += 1
        start = time.perf_counter()
        try:
            results = await self._encode_on(worker, request_id, images)
            handles = [self._handle(image, result) for image, result in zip(images, results)]
            metrics.VISION.observe(time.perf_counter() - start)
        except BaseException:
            self._release_on(worker, request_id)  # what was encoded stays pinned otherwise
            raise
        finally:
            worker.num_inflight -= 1
        return vpb.ImageRefs(vision_address=worker.address, images=handles)

    async def _encode_on(self, worker: Worker, request_id: str,
                         images: Sequence[LoadedImage]) -> list[vpb.EncodeResult]:  # fmt: skip
        calls, group, size = [], [], 0
        for image in images:
            if group and size + len(image.data) > MAX_ENCODE_BYTES:
                calls.append(group)
                group, size = [], 0
            group.append(vpb.ImageInput(data=image.data))
            size += len(image.data)
        calls.append(group)
        try:
            responses = await asyncio.gather(*(
                worker.stub.Encode(vpb.EncodeRequest(request_id=request_id, images=group),
                                   timeout=ENCODE_TIMEOUT_S)
                for group in calls
            ))  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            lost = exc.code() == grpc.StatusCode.UNAVAILABLE
            mark_if_lost(worker, exc)
            message = f"vision worker {worker.worker_id} failed: {exc.code().name}: {exc.details()}"
            raise SampleError(message, 503 if lost else 500, int(lost), retryable=lost) from exc
        return [result for response in responses for result in response.results]

    def _handle(self, image: LoadedImage, result: vpb.EncodeResult) -> vpb.ImageHandle:
        if result.error:
            raise MediaError(f"{image.param}: {result.error}", image.param)
        if result.handle.num_tokens != image.num_tokens:
            message = (f"{image.param}: the vision worker made {result.handle.num_tokens} "
                       f"embeddings, the router counted {image.num_tokens}")  # fmt: skip
            raise SampleError(message, 500)
        return result.handle

    def _release_on(self, worker: Worker, request_id: str) -> None:
        async def release() -> None:
            try:
                await worker.stub.Release(vpb.ReleaseRequest(request_id=request_id), timeout=5.0)
            # The pins expire on their own. A worker removed from the pool (scaled down past its
            # drain's grace period) has a closed channel: a UsageError.
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
                logger.debug("release of %s on %s failed: %s", request_id, worker.address, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


# ---------------------------------------------------------------- the router's command line


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    """`--vision ADDR` (repeatable) and the `MediaConfig` flags."""
    parser.add_argument("--vision", action="append", default=[], help="vision worker address")
    add_dataclass_flags(parser, MediaConfig)


def media_from_args(args: argparse.Namespace) -> tuple[MediaResolver, Pool]:
    """The resolver and its vision pool (static workers from `--vision`, named vision-static-N)."""
    pool = Pool("vision", vpb_grpc.VisionWorkerStub)
    for i, address in enumerate(args.vision):
        pool.add(f"vision-static-{i}", address, static=True)
    config = config_from_args(MediaConfig, args)
    return MediaResolver.from_model(args.model_path, config, pool), pool
