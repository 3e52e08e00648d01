"""Router process: the public gRPC `Router` service behind the HTTP gateway.

For each request: build the prompt (template, tokenizer), resolve sampling (defaults, context
length), run every sample through prefill and decode (`lifecycle.run_sample`), turn tokens into
text and parsed deltas (`postprocess.ChoiceOutput`), and stream `GenerateChunk`s back.
`Tokenize` and `Detokenize` serve the gateway's /tokenize and /detokenize with the same template
and tokenizer, so the gateway holds no model state.

`python -m router.server --model-path DIR --prefill HOST:PORT --decode HOST:PORT` prints
`READY <port>` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import grpc

from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from router.control import ControlServicer, watch_liveness
from router.lifecycle import REQUEST_TIMED_OUT, SampleError, run_sample
from router.media import LoadedImage, MediaResolver, add_media_arguments, media_from_args
from router.pools import POLICIES, Pool, make_pools
from router.postprocess import ChoiceOutput
from router.prompt import InvalidRequest, Prompt, PromptBuilder
from router.sampling import SamplingDefaults, for_sample, resolve_grammar, resolve_sampling
from shared.config import ModelConfig
from shared.parsers.markers import Marker, MarkerTable
from shared.tokenizer import KimiTokenizer
from shared.wire import GRPC_OPTIONS

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 32768
# Seconds from a request's arrival to its end, as SGLang's model gateway defaults to: far beyond
# any normal answer at the default context length, short enough that a stuck request gives its
# KV pages back. 0 turns the limit off.
DEFAULT_REQUEST_TIMEOUT_S = 1800.0


def error_proto(status: int, message: str, param: str = "", code: str = "",
                retry_after: int = 0) -> pb.Error:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 503:
        kind = "service_unavailable_error"
    return pb.Error(http_status=status, type=kind, message=message, param=param, code=code,
                    retry_after_seconds=retry_after)  # fmt: skip


def error_chunk(status: int, message: str, param: str = "", code: str = "",
                retry_after: int = 0) -> pb.GenerateChunk:  # fmt: skip
    return pb.GenerateChunk(error=error_proto(status, message, param, code, retry_after))


def invalid(exc: InvalidRequest) -> pb.Error:
    code = "context_length_exceeded" if "maximum context length" in str(exc) else ""
    return error_proto(400, str(exc), exc.param, code)


def sampling_request(
    request: pb.GenerateRequest, sampling: pb.SamplingParams
) -> pb.GenerateRequest:
    """The request with its resolved sampling parameters (stop ids included)."""
    resolved = pb.GenerateRequest()
    resolved.CopyFrom(request)
    resolved.sampling.CopyFrom(sampling)
    return resolved


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, model_path: str, served_model_name: str, prefill: Pool, decode: Pool,
                 context_length: int, media: MediaResolver,
                 request_timeout: float = 0.0) -> None:  # fmt: skip
        self.tokenizer = KimiTokenizer.from_dir(model_path)
        self.markers = MarkerTable.from_tokenizer(self.tokenizer)
        self.prompts = PromptBuilder(model_path, self.tokenizer, context_length)
        self.sampling_defaults = SamplingDefaults.from_dir(model_path)
        self.served_model_name = served_model_name
        self.prefill, self.decode = prefill, decode
        self.context_length = context_length
        self.media = media
        self.request_timeout = request_timeout  # seconds; 0: no limit

    async def Generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Streams the request's chunks. Past its deadline (`request_timeout` from arrival) the
        request is aborted at every stage, as if its client had left, and ends with a 504."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout if self.request_timeout > 0 else None
        try:
            async with asyncio.timeout_at(deadline):
                prompt, images, sampling = await self._prepare(request)
        except InvalidRequest as exc:  # a MediaError too
            yield pb.GenerateChunk(error=invalid(exc))
            return
        except SampleError as exc:  # no vision worker could encode the images
            yield error_chunk(exc.http_status, str(exc), retry_after=exc.retry_after)
            return
        except TimeoutError:
            self.media.release(request.request_id)
            yield self._timed_out(request.request_id)
            return
        num_samples = max(request.n, 1)
        outputs = [
            ChoiceOutput(
                i, self.tokenizer, self.markers, prompt, sampling_request(request, sampling)
            )
            for i in range(num_samples)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(
                self._run_choice(
                    request, prompt, images, for_sample(sampling, out.index), out, queue
                )
            )
            for out in outputs
        ]
        # The deadline cancels the samples (their worker calls with them) even while this
        # generator waits for a slow client to take a chunk, so pages come back on time.
        timer = deadline and loop.call_at(deadline, self._expire, request, tasks, queue)
        try:
            remaining = num_samples
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                yield item
                if item.HasField("error"):
                    return
            yield pb.GenerateChunk(usage=pb.Usage(
                prompt_tokens=len(prompt.token_ids),
                completion_tokens=sum(o.num_tokens for o in outputs),
                reasoning_tokens=sum(o.num_reasoning_tokens for o in outputs),
                # The prompt is counted once however many samples there are, so is its reuse.
                cached_tokens=max(o.num_cached_tokens for o in outputs),
            ))  # fmt: skip
        finally:
            if timer:
                timer.cancel()
            for task in tasks:
                task.cancel()
            self.media.release(request.request_id)

    async def _prepare(self, request: pb.GenerateRequest
                       ) -> tuple[Prompt, list[LoadedImage], pb.SamplingParams]:  # fmt: skip
        """The prompt (images encoded), its loaded images and the resolved sampling."""
        # Rendering and tokenizing take seconds for a prompt of megabytes: off the loop, so
        # the streams of other requests keep flowing meanwhile.
        built = await asyncio.to_thread(self.prompts.build, request)
        prompt, images = await self.media.expand(request, built)
        sampling = resolve_sampling(request, prompt, self.sampling_defaults,
                                    self.context_length, self.tokenizer.eos_token_ids)  # fmt: skip
        if sampling.HasField("grammar"):  # converting a large schema takes a while: off the loop
            think_end = self.tokenizer.token_id(Marker.THINK_END.value)
            await asyncio.to_thread(resolve_grammar, sampling, prompt, think_end)
        prompt = await self.media.encode(request.request_id, prompt, images)
        return prompt, images, sampling

    def _timed_out(self, request_id: str) -> pb.GenerateChunk:
        logger.warning("request %s passed its %g s deadline; aborted", request_id,
                       self.request_timeout)  # fmt: skip
        message = (f"the request did not finish within the server's limit of "
                   f"{self.request_timeout:g} s (--request-timeout) and was aborted")  # fmt: skip
        return error_chunk(504, message, code="request_timeout")

    def _expire(self, request: pb.GenerateRequest, tasks: list[asyncio.Task],
                queue: asyncio.Queue) -> None:  # fmt: skip
        queue.put_nowait(self._timed_out(request.request_id))  # ahead of the samples' ends
        for task in tasks:
            task.cancel(REQUEST_TIMED_OUT)

    async def _run_choice(self, request: pb.GenerateRequest, prompt: Prompt,
                          images: list[LoadedImage], sampling: pb.SamplingParams,
                          out: ChoiceOutput, queue: asyncio.Queue) -> None:  # fmt: skip
        """Runs one choice; a worker lost before the first token is retried once (after encoding
        the images again when their vision worker was the one lost)."""
        request_id = request.request_id if request.n <= 1 else f"{request.request_id}-{out.index}"
        images_lost = False
        try:
            if (forced := out.start()) is not None:
                await queue.put(pb.GenerateChunk(choices=[forced]))
            for attempt in range(2):
                try:
                    if images_lost:
                        prompt = await self.media.encode_again(request.request_id, prompt, images)
                    await self._stream_choice(f"{request_id}{'-retry' * attempt}", prompt,
                                              sampling, out, queue)  # fmt: skip
                    return
                except SampleError as exc:
                    if attempt == 0 and out.num_tokens == 0 and exc.retryable:
                        images_lost = exc.images_lost
                        logger.warning("request %s lost its worker before the first token (%s); "
                                       "retrying once", request_id, exc)  # fmt: skip
                        continue
                    logger.warning("request %s failed: %s", request_id, exc)
                    message = str(exc)
                    if out.num_tokens:
                        message = f"the request failed after {out.num_tokens} tokens: {exc}"
                    await queue.put(error_chunk(exc.http_status, message,
                                                retry_after=exc.retry_after))  # fmt: skip
                    return
        finally:
            await queue.put(None)

    async def _stream_choice(self, request_id: str, prompt: Prompt, sampling: pb.SamplingParams,
                             out: ChoiceOutput, queue: asyncio.Queue) -> None:  # fmt: skip
        async for event in run_sample(request_id, prompt.token_ids, sampling,
                                      self.prefill, self.decode, images=prompt.images):  # fmt: skip
            delta = out.on_token(event.token) if event.token else None
            out.num_cached_tokens = max(out.num_cached_tokens, event.num_cached_tokens)
            if event.finish_reason or out.finished:
                delta = out.finish(delta, event.finish_reason)
            if delta is not None:
                await queue.put(pb.GenerateChunk(choices=[delta]))
            if out.finished:
                return

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        """The prompt a chat request (or a text) becomes, without generating."""
        try:
            return await asyncio.to_thread(self._tokenize, request)
        except InvalidRequest as exc:
            return pb.TokenizeResponse(error=invalid(exc))

    def _tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        if request.messages:
            add_generation_prompt = (not request.HasField("add_generation_prompt")
                                     or request.add_generation_prompt)  # fmt: skip
            text = self.prompts.render(request.messages, request.tools_json,
                                       request.chat_template_kwargs_json,
                                       add_generation_prompt).text  # fmt: skip
        elif request.HasField("prompt"):
            text = request.prompt
        else:
            raise InvalidRequest("either messages or prompt is required", "messages")
        ids = self.prompts.encode(text, "messages" if request.messages else "prompt")
        response = pb.TokenizeResponse(tokens=ids, max_model_len=self.context_length, text=text)
        if request.return_token_strs:
            response.token_strs.extend(
                self.tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids
            )
        return response

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        """The text of token ids, special tokens kept."""
        try:
            ids = self.prompts.check_token_ids(request.tokens, "tokens")
        except InvalidRequest as exc:
            return pb.DetokenizeResponse(error=invalid(exc))
        return pb.DetokenizeResponse(prompt=self.tokenizer.decode(ids))

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        pools = []
        ready = True
        for pool in (self.prefill, self.decode):
            statuses = []
            for worker in pool.workers:
                try:
                    status = await worker.stub.Status(pb.StatusRequest(), timeout=2.0)
                except grpc.aio.AioRpcError:
                    status = pb.WorkerStatus(worker_id=worker.worker_id, role=pool.role,
                                             state="lost")  # fmt: skip
                status.address = worker.address
                statuses.append(status)
            ready = ready and any(s.state == "ready" for s in statuses)
            pools.append(pb.PoolStatus(role=pool.role, workers=statuses))
        vision = self.media.vision
        if vision.workers:  # a text-only deployment runs no vision pool and needs none
            statuses = [pb.WorkerStatus(worker_id=w.worker_id, role=w.role, address=w.address,
                                        state=w.state) for w in vision.workers]  # fmt: skip
            ready = ready and any(s.state == "ready" for s in statuses)
            pools.append(pb.PoolStatus(role="vision", workers=statuses))
        return pb.HealthResponse(ready=ready, pools=pools, model_name=self.served_model_name,
                                 max_context_length=self.context_length)  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    prefill, decode = make_pools(args.prefill, args.decode, args.policy)
    media, vision = media_from_args(args)
    pools = {"prefill": prefill, "decode": decode, "vision": vision}
    config = ModelConfig.from_dir(args.model_path)
    context_length = args.context_length or min(
        config.text.max_position_embeddings, DEFAULT_CONTEXT_LENGTH
    )
    servicer = RouterServicer(args.model_path, args.served_model_name, prefill, decode,
                              context_length, media, args.request_timeout)  # fmt: skip
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    ctl_grpc.add_ControlServicer_to_server(ControlServicer(pools, args.heartbeat_interval), server)
    liveness = asyncio.create_task(watch_liveness(pools, 3 * args.heartbeat_interval))  # noqa: F841
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    logger.info("router ready on %s:%d (%d prefill, %d decode workers, context %d)", args.host,
                port, len(prefill.workers), len(decode.workers), context_length)  # fmt: skip
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve router")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--served-model-name", default="moonshotai/Kimi-K2.5")
    parser.add_argument("--prefill", action="append", default=[], help="prefill worker address")
    parser.add_argument("--decode", action="append", default=[], help="decode worker address")
    parser.add_argument("--context-length", type=int, default=0)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a request may take from arrival to its end; 0: no limit",
    )
    parser.add_argument("--policy", default="round_robin", choices=POLICIES)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    add_media_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
