"""One sample's trip through the workers (decode-first push, DESIGN.md section 4).

1. Open `DecodeWorker.Generate`: the decode worker reserves pages and answers with a
   `TransferDescriptor`, or RESOURCE_EXHAUSTED when full. A full pool is back-pressure: the
   sample waits (at most `QUEUE_TIMEOUT_S`, at most `MAX_QUEUED` samples at once) and tries
   again, then fails with 503 and Retry-After.
2. Call `PrefillWorker.Prefill` with that descriptor: the prefill worker computes the KV, pushes
   it into the reserved pages and samples the first token. A colocated worker (in both pools
   under one id) prefills its own reservations, into its own pages.
3. Read tokens from the decode stream until it reports a finish reason. The first token's event
   also carries how many prompt tokens the prefill worker found in its prefix cache (the caller
   may stop reading at any token, so the count cannot wait for the finish).
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

QUEUE_TIMEOUT_S = 30.0
MAX_QUEUED = 1024
REQUEST_TIMED_OUT = "request timed out"  # the cancel message of a request past its deadline
PREFILL_REPLY_WAIT_S = 2.0


class SampleError(Exception):
    """A sample failed; `http_status` is what the client should see."""

    def __init__(self, message: str, http_status: int = 500, retry_after: int = 0,
                 retryable: bool = False, images_lost: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after
        self.retryable = retryable  # a worker was lost; another worker may succeed
        # The prefill worker could not fetch the image embeddings (their vision worker died or
        # restarted): a retry must encode the images again first.
        self.images_lost = images_lost


@dataclasses.dataclass
class TokenEvent:
    token: pb.TokenOutput | None
    finish_reason: str = ""
    num_cached_tokens: int = 0  # on the first token's event: prompt tokens from the prefix cache


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
    timer = metrics.SampleTimer(len(prompt_ids))
    prefill, decode, stream, first = await _place(
        request_id, prompt_ids, sampling, prefill_pool, decode_pool, exclude
    )
    timer.reserved()
    prefill_call = None
    try:
        prefill_req = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                        sampling=sampling, destination=first.reservation,
                                        images=images)  # fmt: skip
        prefill_call = asyncio.ensure_future(prefill.stub.Prefill(prefill_req))
        prefill_call.add_done_callback(lambda _: _release(prefill))
        prefill_call.add_done_callback(lambda f: _observe_prefill(f, timer))
        async for event in _decode_events(stream, prefill_call, timer):
            yield event
    except (asyncio.CancelledError, GeneratorExit) as exc:
        # The router cancels with REQUEST_TIMED_OUT when the request's deadline passes.
        reason = "timeout" if REQUEST_TIMED_OUT in exc.args else "client"
        metrics.ABORTS.labels(reason).inc()
        raise
    except SampleError as exc:
        metrics.FAILURES.labels(f"http_{exc.http_status}").inc()
        raise
    except grpc.aio.AioRpcError as exc:
        metrics.FAILURES.labels(exc.code().name.lower()).inc()
        failed_prefill = (
            prefill_call is not None
            and prefill_call.done()
            and not (prefill_call.cancelled() or prefill_call.exception() is None)
        )
        mark_if_lost(prefill if failed_prefill else decode, exc)
        raise _sample_error(exc) from exc
    finally:
        decode.num_inflight -= 1
        if prefill_call is None:
            _release(prefill)
        stream.cancel()
        if prefill_call is not None and not prefill_call.done():
            prefill_call.cancel()


async def _place(
    request_id: str,
    prompt_ids: list[int],
    sampling: pb.SamplingParams,
    prefill_pool: Pool,
    decode_pool: Pool,
    exclude: frozenset[str],
):
    """Picks the prefill worker and reserves pages on a decode worker; both count the request
    in flight from here. Returns the prefill worker, the decode worker, its stream and the
    stream's first message (the reservation)."""
    prefill = prefill_pool.pick(prompt_ids, exclude)
    if prefill is None:
        raise SampleError("no prefill worker is available; retry later", 503, 1)
    # Counted from the pick on, so that a burst whose reservations are still pending spreads.
    prefill.num_inflight += 1
    decode_req = pb.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling
    )
    try:
        decode, stream, first = await _reserve(decode_pool, decode_req, exclude)
    except BaseException:
        _release(prefill)
        raise
    colocated = prefill_pool.get(decode.worker_id)  # prefills into its own pages: no transfer
    if colocated is not None and colocated.state == "ready" and colocated is not prefill:
        _release(prefill)
        prefill = colocated
        prefill.num_inflight += 1
    decode.num_inflight += 1
    for worker in (decode, prefill):
        worker.num_served += 1
    return prefill, decode, stream, first


async def _decode_events(stream, prefill_call: asyncio.Future, timer: metrics.SampleTimer
                         ) -> AsyncIterator[TokenEvent]:  # fmt: skip
    """The decode stream's tokens, then its finish; the first token's event carries the
    prefill's prefix-cache count."""
    first_token = True
    while True:
        chunk = await _read_or_fail(stream, prefill_call)
        if chunk.HasField("token"):
            timer.token()
            cached = await _cached_tokens(prefill_call) if first_token else 0
            first_token = False
            yield TokenEvent(chunk.token, num_cached_tokens=cached)
        if chunk.finish_reason:
            if chunk.finish_reason == "error":
                raise SampleError(f"decode worker failed the request: {chunk.error}", 500)
            timer.finished(chunk.finish_reason)
            yield TokenEvent(None, chunk.finish_reason)
            return


async def _reserve(pool: Pool, request: pb.DecodeRequest, exclude: frozenset[str]):
    """Opens a decode stream whose first message is a reservation; waits while pools are full."""
    deadline = asyncio.get_running_loop().time() + QUEUE_TIMEOUT_S
    delay, queued = 0.01, False
    try:
        while True:
            decode = pool.pick(list(request.prompt_token_ids), exclude)
            if decode is None:
                raise SampleError("no decode worker is available; retry later", 503, 1)
            stream = decode.stub.Generate(request)
            try:
                first = await stream.read()
            except grpc.aio.AioRpcError as exc:
                mark_if_lost(decode, exc)
                full = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                now = asyncio.get_running_loop().time()
                if not full or now + delay > deadline:
                    raise
                if not queued:
                    if pool.num_queued >= MAX_QUEUED:
                        raise SampleError("too many requests wait for KV pages", 503, 1) from exc
                    queued, pool.num_queued = True, pool.num_queued + 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            if first is grpc.aio.EOF or not first.HasField("reservation"):
                stream.cancel()
                raise SampleError("decode worker closed the stream before reserving pages", 503, 1)
            return decode, stream, first
    except grpc.aio.AioRpcError as exc:
        raise _sample_error(exc) from exc
    finally:
        if queued:
            pool.num_queued -= 1


def mark_if_lost(worker, exc: grpc.aio.AioRpcError) -> None:
    """A worker that cannot be reached leaves the rotation now; its next heartbeat brings it back
    (a static worker's channel connecting again, `Pool.revive_static`)."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and worker.state == "ready":
        logger.warning("%s worker %s is unreachable; out of rotation", worker.role,
                       worker.worker_id)  # fmt: skip
        worker.state = "lost"


def _sample_error(exc: grpc.aio.AioRpcError) -> SampleError:
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the prefill worker's image fetch
        return SampleError(f"the image embeddings are gone: {exc.details()}", 503, 1,
                           retryable=True, images_lost=True)  # fmt: skip
    status = _status_to_http(exc.code())
    lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                          grpc.StatusCode.UNKNOWN)  # fmt: skip
    return SampleError(f"{exc.code().name}: {exc.details()}", status, 1 if status == 503 else 0,
                       retryable=lost)  # fmt: skip


def _observe_prefill(call: asyncio.Future, timer: metrics.SampleTimer) -> None:
    if call.cancelled() or call.exception() is not None:
        return
    reply = call.result()
    timer.prefill_done(reply.prefill_seconds, reply.transfer_seconds, reply.transfer_bytes,
                       reply.cached_tokens)  # fmt: skip


async def _cached_tokens(prefill_call: asyncio.Future) -> int:
    """The prefill reply's `cached_tokens`. The reply leaves the prefill worker when the decode
    worker acknowledges the KV, so it lands about when the first token does: wait briefly."""
    if prefill_call.cancelled():
        return 0
    try:
        reply = await asyncio.wait_for(asyncio.shield(prefill_call), PREFILL_REPLY_WAIT_S)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        return 0
    return reply.cached_tokens


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
