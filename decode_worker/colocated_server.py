"""Colocated worker process: prefill and decode in one process, one model, one KV cache, one loop.

The baseline that disaggregation is measured against (`bench/compare.sh`): `kimiserve up
--colocated` starts these in place of the prefill and decode pools. The router is unchanged: the
worker serves both gRPC services on one port and registers under both roles with one id, so the
decode-first push protocol runs as usual:

1. `DecodeWorker.Generate` reserves the prompt's pages and answers with a `TransferDescriptor`
   (the decode worker's own servicer).
2. `PrefillWorker.Prefill` with a descriptor of this worker computes the prompt straight into
   those pages (a `PrefillJob` that brings its `pages`): no copy, no transfer. First the request
   is marked as transferring (`DecodeEngine.pages_of`), so an abort from then on frees the pages
   only when the prefill has ended; when it ends, with the first token or an error, the request
   goes to the decode engine (`on_kv_ready`) exactly once, from the future's done callback.
   A descriptor of another worker (several colocated workers, or prefill workers beside them)
   takes the prefill worker's path: latents copied out and pushed by the `KVSender`; this
   worker's `KVReceiver` accepts such pushes too.
3. One engine thread runs, in turn, one prefill step (when prompts wait) and one decode step.
   A long prompt's step stalls every running request's next token: that is what disaggregation
   removes, and what the comparison measures.

`python -m decode_worker.colocated_server --model-path DIR --worker-id decode-0 --port 0` prints
`READY <port>` once it serves.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent import futures

import grpc
import torch

from decode_worker.engine import DecodeEngine
from decode_worker.server import DecodeServicer, swap_load
from prefill_worker.engine import PrefillEngine, PrefillJob
from prefill_worker.server import PrefillServicer
from prefill_worker.vision_client import VisionFetchError
from proto import control_pb2 as ctl
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.grammar import GrammarCache
from shared.kv_transfer import KVReceiver, KVSender
from shared.model.loader import load_text_model
from shared.registration import load_of, register_and_beat
from shared.runner import ModelRunner
from shared.settings import WorkerConfig, parse_worker_config
from shared.wire import GRPC_OPTIONS, sampling_from_proto, token_to_proto

logger = logging.getLogger(__name__)


class ColocatedEngine(DecodeEngine):
    """A decode engine whose loop also steps a `PrefillEngine` over the same runner and cache."""

    def __init__(self, runner: ModelRunner, prefill: PrefillEngine, transfer_timeout: float,
                 swap_space_bytes: int = -1):  # fmt: skip
        super().__init__(runner, transfer_timeout=transfer_timeout,
                         swap_space_bytes=swap_space_bytes)  # fmt: skip
        assert prefill.runner is runner, "a colocated prefill computes into the decode cache"
        self.prefill = prefill

    def submit_prefill(self, job: PrefillJob) -> futures.Future:
        """Queues a prompt (raises ValueError for a bad one) and wakes the loop."""
        future = self.prefill.submit(job)
        self._wakeup.set()
        return future

    def run_once(self) -> bool:
        """One prefill step over waiting prompts (finished ones join the batch at once), then
        one decode step; False when there was nothing to do."""
        prefilled = self.prefill.step() > 0
        return super().run_once() or prefilled


class ColocatedPrefillServicer(PrefillServicer):
    """`PrefillWorker` of a colocated worker: prompts reserved here are computed in place."""

    def __init__(self, config: WorkerConfig, engine: ColocatedEngine, sender: KVSender,
                 grammars: GrammarCache | None = None) -> None:  # fmt: skip
        super().__init__(config, engine.prefill, sender, grammars)
        self.colocated = engine

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext):
        if request.destination.decode_worker_id != self.config.worker_id:
            return super().Prefill(request, context)  # another worker's pages: push the KV
        started = time.perf_counter()
        request_id = request.request_id
        pages = self.colocated.pages_of(request_id)
        if pages is None:
            context.abort(grpc.StatusCode.ABORTED, f"request {request_id} is not reserved here")
        job = PrefillJob(request_id, list(request.prompt_token_ids),
                         sampling_from_proto(request.sampling), pages=pages)  # fmt: skip
        try:  # a GrammarError is a ValueError
            job.grammar = self.grammar_state(job, request.sampling)
            job.input_embeds = self.vision.prompt_embeds(request.images, job.prompt_ids)
            future = self.colocated.submit_prefill(job)
        except (VisionFetchError, ValueError) as exc:
            self.colocated.on_kv_ready(request_id, None, str(exc))  # frees the pages
            code = getattr(exc, "code", grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(exc))
        future.add_done_callback(lambda done: self._hand_over(request_id, done))
        context.add_callback(future.cancel)
        try:
            result = future.result()
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
        return pb.PrefillResponse(first_token=token_to_proto(result.first),
                                  prefill_seconds=time.perf_counter() - started)  # fmt: skip

    def _hand_over(self, request_id: str, future: futures.Future) -> None:
        """The prefill ended (on the engine thread, or where it was cancelled while queued)."""
        if future.cancelled():
            self.colocated.on_kv_ready(request_id, None, "prefill cancelled")
        elif future.exception() is not None:
            self.colocated.on_kv_ready(request_id, None, f"prefill failed: {future.exception()}")
        else:
            self.colocated.on_kv_ready(request_id, future.result().first)


def _receiver(config: WorkerConfig, engine: DecodeEngine) -> KVReceiver:
    """Accepts pushes from other prefill workers, as a decode worker does."""
    return KVReceiver(
        host=config.host,
        cache=engine.runner.cache,
        resolve=engine.pages_of,
        on_done=engine.on_transfer_done,
        timeout=config.kv_transfer_timeout,
    )


def serve(config: WorkerConfig) -> None:
    assert config.ep_size == 1, "a colocated worker runs one rank (no expert parallelism)"
    torch.set_grad_enabled(False)
    model = load_text_model(
        config.model_path, dtype=getattr(torch, config.dtype), device=config.device
    )
    runner = ModelRunner(model, config.num_pages, config.page_size, config.device,
                         config.attention_backend)  # fmt: skip
    # No prefix cache here (`--prefix-cache` is ignored): most prefills bring pages the decode
    # engine reserved, and cached pages would sit in the allocator the decode engine admits by.
    engine = ColocatedEngine(runner, PrefillEngine(runner), config.kv_transfer_timeout,
                             config.swap_space_bytes)  # fmt: skip
    receiver = _receiver(config, engine)
    sender = KVSender(config.worker_id, config.kv_transfer_timeout, config.fault_kv_delay)
    engine.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=GRPC_OPTIONS)
    grammars = GrammarCache.for_model(config.model_path, runner.model.config.vocab_size)
    decode = DecodeServicer(config, engine, receiver, grammars)
    pb_grpc.add_DecodeWorkerServicer_to_server(decode, server)
    pb_grpc.add_PrefillWorkerServicer_to_server(
        ColocatedPrefillServicer(config, engine, sender, grammars), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    server.start()
    logger.info("colocated worker %s ready on %s:%d (%d pages of %d tokens)", config.worker_id,
                config.host, port, config.num_pages, config.page_size)  # fmt: skip

    def load() -> ctl.WorkerLoad:
        status = decode.Status(None, None)
        status.num_waiting = engine.prefill.num_waiting
        load = load_of(status)
        load.num_swapped, load.num_preemptions = swap_load(engine)
        return load

    if config.router_address:
        for role in ("decode", "prefill"):  # one id in both pools; a heartbeat refreshes both
            register_and_beat(config.router_address, role, config.worker_id,
                              f"{config.host}:{port}", load)  # fmt: skip
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    serve(parse_worker_config(argv, "kimiserve colocated worker (prefill and decode)"))


if __name__ == "__main__":
    main()
