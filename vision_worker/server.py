"""Vision worker process: gRPC front end over the vision engine and its embedding cache.

`Encode` returns one handle (content hash, token count) per image, or a per-image error for an
image that cannot be decoded; the embeddings stay here, pinned for the request until `Release`.
`Fetch` streams embeddings by handle to the prefill worker; `Status` reports the cache.

With `--router-address` the worker registers with the router as a "vision" worker before it
reports ready, and its heartbeats carry its load (`load_of_vision`): images encoding and queued,
and the cache's bytes, images, hits and misses. Without it, the router must be given its address
(`--vision`). Leaving is the router's business: it drains the worker (no new encodes, and the
images it holds stay fetchable until their requests end) before the launcher stops it.

`python -m vision_worker.server --model-path DIR --worker-id vision-0 --port 0` prints
`READY <port>` on stdout once it serves.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import torch

from proto import control_pb2 as ctl
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc
from shared.image_processing import ImageProcessingConfig
from shared.model.vision import load_vision_model
from shared.registration import register_and_beat
from shared.settings import VisionWorkerConfig, parse_config
from shared.wire import GRPC_OPTIONS
from vision_worker.cache import EmbeddingCache
from vision_worker.engine import DecodedImage, ImageInput, VisionEngine

logger = logging.getLogger(__name__)

# Bytes of embedding rows per streamed message, well under the gRPC message limit.
FETCH_CHUNK_BYTES = 4 * 1024 * 1024


class VisionServicer(vpb_grpc.VisionWorkerServicer):
    def __init__(self, config: VisionWorkerConfig, engine: VisionEngine) -> None:
        self.config = config
        self.engine = engine
        self.cache = engine.cache

    def Encode(self, request: vpb.EncodeRequest, context: grpc.ServicerContext):
        images = [_image_input(image) for image in request.images]
        try:
            results = self.engine.encode(request.request_id, images)
        except Exception as exc:  # the encoder pass failed: a server error, not a bad image
            logger.exception("encode for %s failed", request.request_id)
            context.abort(grpc.StatusCode.INTERNAL, f"the vision encoder failed: {exc}")
        if not context.is_active():  # the router gave up meanwhile; its Release may be past
            self.cache.release(request.request_id)
        return vpb.EncodeResponse(results=[
            vpb.EncodeResult(error=r.error) if r.error else
            vpb.EncodeResult(handle=vpb.ImageHandle(content_hash=r.content_hash,
                                                    num_tokens=r.num_tokens))
            for r in results
        ])  # fmt: skip

    def Fetch(
        self, request: vpb.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[vpb.EmbeddingChunk]:
        found = [self.cache.get(key) for key in request.content_hashes]
        for key, embeds in zip(request.content_hashes, found):
            if embeds is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no embeddings for image {key}")
        for index, embeds in enumerate(found):
            yield from embedding_chunks(index, embeds)

    def Release(self, request: vpb.ReleaseRequest, context) -> vpb.ReleaseResponse:
        return vpb.ReleaseResponse(num_released=self.cache.release(request.request_id))

    def Status(self, request: vpb.VisionStatusRequest, context) -> vpb.VisionStatus:
        stats = self.cache.stats()
        return vpb.VisionStatus(
            worker_id=self.config.worker_id,
            state="ready",
            cache_bytes=stats.num_bytes,
            max_cache_bytes=self.cache.max_bytes,
            num_cached_images=stats.num_entries,
            num_hits=stats.num_hits,
            num_misses=stats.num_misses,
            num_pinned_images=stats.num_pinned,
            num_waiting=self.engine.num_waiting,
        )


def load_of_vision(engine: VisionEngine) -> ctl.WorkerLoad:
    """The vision worker's load for its heartbeat."""
    stats = engine.cache.stats()
    return ctl.WorkerLoad(
        num_running=engine.num_running,
        num_waiting=engine.num_waiting,
        cache_bytes=stats.num_bytes,
        num_cached_images=stats.num_entries,
        num_cache_hits=stats.num_hits,
        num_cache_misses=stats.num_misses,
    )


def _image_input(image: vpb.ImageInput) -> ImageInput:
    if image.HasField("decoded"):
        d = image.decoded
        return DecodedImage(d.width, d.height, d.rgb)
    return image.data


def embedding_chunks(index: int, embeds: torch.Tensor) -> Iterator[vpb.EmbeddingChunk]:
    """[N, E] embeddings as messages of whole rows, raw little-endian bytes."""
    num_rows, hidden = embeds.shape
    dtype = str(embeds.dtype).removeprefix("torch.")
    rows_per_chunk = max(1, FETCH_CHUNK_BYTES // (hidden * embeds.element_size()))
    raw = embeds.contiguous().view(torch.uint8)  # [N, E * element size]
    for start in range(0, max(num_rows, 1), rows_per_chunk):
        data = raw[start : start + rows_per_chunk].numpy().tobytes()
        yield vpb.EmbeddingChunk(image_index=index, shape=[num_rows, hidden], dtype=dtype,
                                 row_start=start, data=data)  # fmt: skip


def serve(config: VisionWorkerConfig) -> None:
    torch.set_grad_enabled(False)
    model = load_vision_model(config.model_path, dtype=getattr(torch, config.dtype))
    cache = EmbeddingCache(config.max_cache_bytes, config.pin_timeout)
    engine = VisionEngine(model, ImageProcessingConfig.from_dir(config.model_path), cache,
                          config.max_batch_patches, config.max_image_pixels)  # fmt: skip
    engine.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=GRPC_OPTIONS)
    vpb_grpc.add_VisionWorkerServicer_to_server(VisionServicer(config, engine), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    server.start()
    logger.info("vision worker %s ready on %s:%d (cache %d bytes)", config.worker_id,
                config.host, port, config.max_cache_bytes)  # fmt: skip
    if config.router_address:
        register_and_beat(config.router_address, "vision", config.worker_id,
                          f"{config.host}:{port}", lambda: load_of_vision(engine))  # fmt: skip
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    serve(parse_config(VisionWorkerConfig, argv, "kimiserve vision worker"))


if __name__ == "__main__":
    main()
