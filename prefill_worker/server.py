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
from prefill_worker.vision_client import VisionClient, VisionFetchError
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.config import ModelConfig
from shared.kv_transfer import KVSender, TransferError
from shared.messages import KVPushMsg
from shared.model.loader import load_text_model
from shared.registration import load_of, register_and_beat
from shared.runner import ModelRunner
from shared.settings import WorkerConfig, parse_worker_config
from shared.wire import GRPC_OPTIONS, sampling_from_proto, token_to_proto

logger = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, config: WorkerConfig, engine: PrefillEngine, sender: KVSender) -> None:
        self.config = config
        self.engine = engine
        self.sender = sender
        placeholder_id = ModelConfig.from_dir(config.model_path).media_placeholder_token_id
        self.vision = VisionClient(engine.runner.model.embed_tokens, placeholder_id)

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        job = PrefillJob(request.request_id, list(request.prompt_token_ids),
                         sampling_from_proto(request.sampling))  # fmt: skip
        try:  # image embeddings come straight from the vision worker, on this handler thread
            job.input_embeds = self.vision.prompt_embeds(request.images, job.prompt_ids)
        except VisionFetchError as exc:
            context.abort(exc.code, str(exc))
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
            self.sender.send(dest.rendezvous_address, dest.control_address, push, result.kv)
        except TransferError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.PrefillResponse(
            first_token=token_to_proto(result.first),
            prefill_seconds=prefill_seconds,
            transfer_seconds=time.perf_counter() - started - prefill_seconds,
            transfer_bytes=result.kv.numel() * result.kv.element_size(),
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:
        allocator = self.engine.runner.allocator
        return pb.WorkerStatus(
            worker_id=self.config.worker_id,
            role="prefill",
            state="ready",
            num_free_pages=allocator.num_free,
            num_total_pages=allocator.num_pages,
            num_waiting=self.engine.num_waiting,
        )


def serve(config: WorkerConfig) -> None:
    torch.set_grad_enabled(False)
    model = load_text_model(config.model_path, dtype=getattr(torch, config.dtype))
    engine = PrefillEngine(ModelRunner(model, config.num_pages, config.page_size))
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
