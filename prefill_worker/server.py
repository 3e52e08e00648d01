"""Prefill worker process: gRPC front end, prefill engine loop and KV sender.

`python -m prefill_worker.server --model-path DIR --worker-id prefill-0 --port 0` prints
`READY <port>` on stdout once it serves.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent import futures

import grpc
import torch

from prefill_worker.engine import PrefillEngine, PrefillJob
from prefill_worker.prefix_cache import prompt_keys
from prefill_worker.vision_client import VisionClient, VisionFetchError
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.config import ModelConfig
from shared.grammar import GrammarCache, GrammarError, GrammarState
from shared.kv_transfer import KVSender, TransferError
from shared.messages import KVPushMsg
from shared.model.loader import load_text_model
from shared.registration import load_of, register_and_beat
from shared.runner import ModelRunner
from shared.settings import WorkerConfig, parse_worker_config
from shared.wire import GRPC_OPTIONS, sampling_from_proto, token_to_proto

logger = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, config: WorkerConfig, engine: PrefillEngine, sender: KVSender,
                 grammars: GrammarCache | None = None) -> None:  # fmt: skip
        self.config = config
        self.engine = engine
        self.sender = sender
        self.placeholder_id = ModelConfig.from_dir(config.model_path).media_placeholder_token_id
        self.vision = VisionClient(engine.runner.model.embed_tokens, self.placeholder_id)
        vocab_size = engine.runner.model.config.vocab_size
        self.grammars = grammars or GrammarCache.for_model(config.model_path, vocab_size)

    def grammar_state(self, job: PrefillJob, params: pb.SamplingParams) -> GrammarState | None:
        """The job's constraint, compiled on this handler thread; raises `GrammarError`."""
        spec = job.sampling.grammar
        return None if spec is None else self.grammars.start(spec, params.stop_token_ids)

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        job = PrefillJob(request.request_id, list(request.prompt_token_ids),
                         sampling_from_proto(request.sampling))  # fmt: skip
        try:
            job.grammar = self.grammar_state(job, request.sampling)
        except GrammarError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"response_format: {exc}")
        try:  # image embeddings come straight from the vision worker, on this handler thread
            job.input_embeds = self.vision.prompt_embeds(request.images, job.prompt_ids)
        except VisionFetchError as exc:
            context.abort(exc.code, str(exc))
        if job.input_embeds is not None:  # the splice succeeded, so the counts agree
            images = [(image.content_hash, image.num_tokens) for image in request.images.images]
            job.cache_keys = prompt_keys(job.prompt_ids, self.placeholder_id, images)
        try:
            future = self.engine.submit(job)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context.add_callback(future.cancel)
        result = future.result()
        prefill_seconds = time.perf_counter() - started
        dest = request.destination
        push = KVPushMsg(
            pair_id="",
            request_id=request.request_id,
            num_tokens=len(job.prompt_ids),
            tag=0,
            first_token=result.first.token_id,
            first_logprob=result.first.logprob,
            first_top_logprobs=result.first.top_logprobs,
        )
        try:
            self.sender.send(dest.rendezvous_address, dest.control_address, push, result.ckv,
                             result.kpe, list(dest.page_ids), dest.page_size)  # fmt: skip
        except TransferError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.PrefillResponse(
            first_token=token_to_proto(result.first),
            prefill_seconds=prefill_seconds,
            transfer_seconds=time.perf_counter() - started - prefill_seconds,
            transfer_bytes=(result.ckv.numel() + result.kpe.numel()) * result.ckv.element_size(),
            cached_tokens=result.num_cached,
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:
        allocator = self.engine.runner.allocator
        return pb.WorkerStatus(
            worker_id=self.config.worker_id,
            role="prefill",
            state="ready",
            num_free_pages=self.engine.num_free_pages,  # cached pages nobody reads count
            num_total_pages=allocator.num_pages,
            num_waiting=self.engine.num_waiting,
            num_cached_pages=self.engine.num_cached_pages,
        )


def serve(config: WorkerConfig) -> None:
    torch.set_grad_enabled(False)
    model = load_text_model(
        config.model_path, dtype=getattr(torch, config.dtype), device=config.device
    )
    runner = ModelRunner(model, config.num_pages, config.page_size, config.device,
                         config.attention_backend)  # fmt: skip
    engine = PrefillEngine(runner, prefix_cache=config.prefix_cache)
    engine.start()
    sender = KVSender(config.worker_id, config.kv_transfer_timeout, config.fault_kv_delay)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=GRPC_OPTIONS)
    servicer = PrefillServicer(config, engine, sender)
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    server.start()
    logger.info("prefill worker %s ready on %s:%d", config.worker_id, config.host, port)
    if config.router_address:
        register_and_beat(config.router_address, "prefill", config.worker_id,
                          f"{config.host}:{port}", lambda: load_of(servicer.Status(None, None)))  # fmt: skip
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    serve(parse_worker_config(argv, "kimiserve prefill worker"))


if __name__ == "__main__":
    main()
