"""One sample's trip through the workers (decode-first push, DESIGN.md section 4).

1. Open `DecodeWorker.Generate`: the decode worker reserves pages and answers with a
   `TransferDescriptor` (or RESOURCE_EXHAUSTED when full).
2. Call `PrefillWorker.Prefill` with that descriptor: the prefill worker computes the KV, pushes
   it into the reserved pages and samples the first token.
3. Read tokens from the decode stream until it reports a finish reason.
Leaving early (client gone, error) cancels both calls; the decode worker frees the pages when
its stream is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc

from proto import kimiserve_pb2 as pb
from proto import vision_pb2 as vpb
from router import metrics
from router.pools import Pool

logger = logging.getLogger(__name__)


class SampleError(Exception):
    """A sample failed; `http_status` is what the client should see."""

    def __init__(self, message: str, http_status: int = 500, retry_after: int = 0,
                 retryable: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after
        self.retryable = retryable  # a worker was lost; another worker may succeed


@dataclasses.dataclass
class TokenEvent:
    token: pb.TokenOutput | None
    finish_reason: str = ""


def _status_to_http(code: grpc.StatusCode) -> int:
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return 503
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return 400
    return 500


async def run_sample(
    request_id: str,
    prompt_ids: list[int],
    sampling: pb.SamplingParams,
    prefill_pool: Pool,
    decode_pool: Pool,
    exclude: frozenset[str] = frozenset(),
    images: vpb.ImageRefs | None = None,
) -> AsyncIterator[TokenEvent]:
    """Yields the sample's tokens, then one event with the finish reason.

    `exclude` names workers to avoid when others are ready (a retry after a lost worker).
    """
    decode = decode_pool.pick(prompt_ids, exclude)
    prefill = prefill_pool.pick(prompt_ids, exclude)
    if decode is None or prefill is None:
        empty = "decode" if decode is None else "prefill"
        raise SampleError(f"no {empty} worker is available; retry later", 503, 1, retryable=False)
    decode_req = pb.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling
    )
    stream = decode.stub.Generate(decode_req)
    timer = metrics.SampleTimer(len(prompt_ids))
    prefill_call = None
    for worker in (decode, prefill):
        worker.num_inflight += 1
        worker.num_served += 1
    try:
        first = await stream.read()
        if first is grpc.aio.EOF or not first.HasField("reservation"):
            raise SampleError("decode worker closed the stream before reserving pages", 503, 1)
        timer.reserved()
        prefill_req = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                        sampling=sampling, destination=first.reservation,
                                        images=images)  # fmt: skip
        prefill_call = asyncio.ensure_future(prefill.stub.Prefill(prefill_req))
        prefill_call.add_done_callback(lambda _: _release(prefill))
        prefill_call.add_done_callback(lambda f: _observe_prefill(f, timer))
        while True:
            chunk = await _read_or_fail(stream, prefill_call)
            if chunk.HasField("token"):
                timer.token()
                yield TokenEvent(chunk.token)
            if chunk.finish_reason:
                if chunk.finish_reason == "error":
                    raise SampleError(f"decode worker failed the request: {chunk.error}", 500)
                timer.finished(chunk.finish_reason)
                yield TokenEvent(None, chunk.finish_reason)
                return
    except (asyncio.CancelledError, GeneratorExit):
        metrics.ABORTS.labels("client").inc()
        raise
    except SampleError as exc:
        metrics.FAILURES.labels(f"http_{exc.http_status}").inc()
        raise
    except grpc.aio.AioRpcError as exc:
        metrics.FAILURES.labels(exc.code().name.lower()).inc()
        status = _status_to_http(exc.code())
        lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                              grpc.StatusCode.UNKNOWN)  # fmt: skip
        raise SampleError(f"{exc.code().name}: {exc.details()}", status, 1 if status == 503 else 0,
                          retryable=lost) from exc  # fmt: skip
    finally:
        decode.num_inflight -= 1
        if prefill_call is None:
            _release(prefill)
        stream.cancel()
        if prefill_call is not None and not prefill_call.done():
            prefill_call.cancel()


def _observe_prefill(call: asyncio.Future, timer: metrics.SampleTimer) -> None:
    if call.cancelled() or call.exception() is not None:
        return
    reply = call.result()
    timer.prefill_done(reply.prefill_seconds, reply.transfer_seconds, reply.transfer_bytes)


def _release(worker) -> None:
    worker.num_inflight -= 1


async def _read_or_fail(stream, prefill_call: asyncio.Future) -> pb.DecodeChunk:
    """The next decode chunk; raises the prefill call's error if it fails first."""
    read = asyncio.ensure_future(stream.read())
    while True:
        waiting = {read} if prefill_call.done() else {read, prefill_call}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if read in done:
            chunk = read.result()
            if chunk is grpc.aio.EOF:
                raise SampleError(
                    "decode stream ended without a finish reason", 500, retryable=True
                )
            return chunk
        if prefill_call.exception() is not None:
            read.cancel()
            raise prefill_call.exception()
