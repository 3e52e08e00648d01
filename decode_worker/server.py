"""Decode worker process: gRPC front end, KV receiver and the decode engine loop.

`python -m decode_worker.server --model-path DIR --worker-id decode-0 --port 0` prints
`READY <port>` on stdout once it serves (the launcher reads it).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from concurrent import futures

import grpc
import torch

from decode_worker.engine import DecodeEngine, Request
from proto import control_pb2 as ctl
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.config import ModelConfig
from shared.grammar import GrammarCache, GrammarError
from shared.kv_cache import OutOfPagesError, pages_needed
from shared.kv_transfer import KVReceiver
from shared.model.expert_parallel import (
    EPContext,
    ExpertPlacement,
    create_ep_group,
    enable_expert_parallel,
)
from shared.model.expert_stats import ExpertStats, enable_expert_stats
from shared.model.loader import load_text_model
from shared.registration import load_of, register_and_beat
from shared.runner import ModelRunner
from shared.settings import WorkerConfig, parse_worker_config
from shared.wire import GRPC_OPTIONS, sampling_from_proto, token_to_proto

logger = logging.getLogger(__name__)


def swap_load(engine: DecodeEngine) -> tuple[int, int]:
    """(requests swapped out now, preemptions since start) for the heartbeat's load."""
    return engine.swap.num_swapped, engine.swap.num_preemptions


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(self, config: WorkerConfig, engine: DecodeEngine, receiver: KVReceiver,
                 grammars: GrammarCache | None = None) -> None:  # fmt: skip
        self.config = config
        self.engine = engine
        self.receiver = receiver
        vocab_size = engine.runner.model.config.vocab_size
        self.grammars = grammars or GrammarCache.for_model(config.model_path, vocab_size)

    def Generate(self, request: pb.DecodeRequest, context: grpc.ServicerContext):
        params = request.sampling
        req = Request(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            sampling=sampling_from_proto(params),
            max_tokens=max(params.max_tokens, 1),
            stop_token_ids=frozenset(params.stop_token_ids),
            page_table=[],
        )
        if req.sampling.grammar is not None:  # compiled here, off the engine thread
            try:
                req.grammar = self.grammars.start(req.sampling.grammar, params.stop_token_ids)
            except GrammarError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"response_format: {exc}")
        allocator, page_size = self.engine.runner.allocator, self.engine.runner.page_size
        need = pages_needed(len(req.prompt_ids) + 1, page_size)
        if need > allocator.num_pages:  # can never fit: an error now, not a wait
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the prompt of {len(req.prompt_ids)} tokens needs {need} KV pages; "
                          f"a decode worker holds {allocator.num_pages}")  # fmt: skip
        try:
            pages = self.engine.reserve(req)
        except OutOfPagesError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker is full: {exc}")
        context.add_callback(lambda: self.engine.abort(req.request_id))
        yield pb.DecodeChunk(
            reservation=pb.TransferDescriptor(
                request_id=req.request_id,
                decode_worker_id=self.config.worker_id,
                page_ids=pages,
                page_size=self.engine.runner.page_size,
                rendezvous_address=self.receiver.rendezvous_address,
                control_address=self.receiver.control_address,
            )
        )
        while True:
            try:
                out = req.outputs.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if out.sampled is not None:
                yield pb.DecodeChunk(token=token_to_proto(out.sampled))
            if out.finish_reason:
                yield pb.DecodeChunk(finish_reason=out.finish_reason, error=out.error)
                return

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.engine.abort(request.request_id))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:
        runner = self.engine.runner
        return pb.WorkerStatus(
            worker_id=self.config.worker_id,
            role="decode",
            state="ready",
            num_free_pages=runner.allocator.num_free,
            num_total_pages=runner.allocator.num_pages,
            num_running=len(self.engine.running),
        )


def serve(config: WorkerConfig) -> None:
    torch.set_grad_enabled(False)
    placement = _placement(config)
    owned = placement.local_experts(config.ep_rank) if placement else None
    model = load_text_model(config.model_path, dtype=getattr(torch, config.dtype),
                             device=config.device, owned_experts=owned)  # fmt: skip
    stats = enable_expert_stats(model) if config.expert_stats else None
    runner = ModelRunner(model, config.num_pages, config.page_size, config.device,
                         config.attention_backend)  # fmt: skip
    engine = DecodeEngine(runner, transfer_timeout=config.kv_transfer_timeout,
                          swap_space_bytes=config.swap_space_bytes)  # fmt: skip
    receiver = KVReceiver(
        host=config.host,
        cache=runner.cache,
        resolve=engine.pages_of,
        on_done=engine.on_transfer_done,
        timeout=config.kv_transfer_timeout,
    )
    if placement is not None:
        _join_expert_group(config, model, engine, placement)
    engine.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=GRPC_OPTIONS)
    servicer = DecodeServicer(config, engine, receiver)
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    server.start()
    logger.info(
        "decode worker %s ready on %s:%d (%d pages of %d tokens, %d KV bytes per token)",
        config.worker_id, config.host, port, config.num_pages, config.page_size,
        runner.cache.bytes_per_token(),
    )  # fmt: skip
    if config.router_address:
        register_and_beat(config.router_address, "decode", config.worker_id,
                          f"{config.host}:{port}", lambda: _load(servicer, stats))  # fmt: skip
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    server.wait_for_termination()


def _load(servicer: DecodeServicer, stats: ExpertStats | None) -> ctl.WorkerLoad:
    """The heartbeat's load; with `--expert-stats`, also the tokens per expert since start."""
    load = load_of(servicer.Status(None, None))
    load.num_swapped, load.num_preemptions = swap_load(servicer.engine)
    if stats is not None:
        # Limitation: every beat carries all counts, not the change since the last one; at
        # Kimi-K2.5's 60 MoE layers x 384 experts that is 23k varints (about 100 KB) a
        # second per rank. Send deltas, or sample less often, if that ever matters.
        load.expert_token_layers.extend(stats.layer_ids)
        load.expert_tokens.extend(stats.flat())
    return load


def _placement(config: WorkerConfig) -> ExpertPlacement | None:
    if config.ep_size <= 1:
        return None
    num_experts = ModelConfig.from_dir(config.model_path).text.n_routed_experts
    if config.expert_placement:
        return ExpertPlacement.from_file(config.expert_placement, num_experts, config.ep_size)
    return ExpertPlacement.round_robin(num_experts, config.ep_size)


def _join_expert_group(config: WorkerConfig, model, engine: DecodeEngine,
                       placement: ExpertPlacement) -> None:  # fmt: skip
    """Rank `ep_rank` of this worker's group: lockstep steps, MoE over all ranks' experts."""
    group, keepalive = create_ep_group(config.ep_rendezvous, config.ep_rank, config.ep_size,
                                       timeout_s=config.kv_transfer_timeout)  # fmt: skip
    enable_expert_parallel(model, EPContext(group, config.ep_rank, placement, keepalive=keepalive))

    def all_running(count: int) -> int:
        total = torch.tensor([count])
        group.allreduce([total]).wait()
        return int(total)

    def exit_now() -> None:
        time.sleep(0.5)  # lets the gRPC handlers send the error events
        os._exit(1)

    engine.lockstep, engine.on_fatal = all_running, exit_now
    logger.info("decode rank %d of %d holds experts %s", config.ep_rank, config.ep_size,
                placement.local_experts(config.ep_rank))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    serve(parse_worker_config(argv, "kimiserve decode worker"))


if __name__ == "__main__":
    main()
