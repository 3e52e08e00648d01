"""The gateway's gRPC client of the router.

One `grpc.aio` channel per gateway process, opened in the app's lifespan (it must live on the
server's event loop) and closed at shutdown. Each HTTP request gets one `RouterCall`, which ties
the `Router.Generate` stream to the HTTP connection: when the client disconnects, the call is
cancelled, and the router sees the cancellation and aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from starlette.requests import Request

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from router.errors import ClientGone, from_proto_error, from_rpc_error, router_unavailable

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
UNARY_TIMEOUT_S = 60.0  # tokenizing a prompt near the body limit takes seconds, not minutes
MIN_MESSAGE_BYTES = 64 * 1024 * 1024


class RouterClient:
    """Owns the channel to the router; `start()` and `close()` run on the serving loop."""

    def __init__(self, address: str, max_body_bytes: int) -> None:
        self.address = address
        # A request's protobuf is about as large as its JSON body (base64 images stay strings).
        size = max(MIN_MESSAGE_BYTES, 2 * max_body_bytes)
        self._options = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.RouterStub | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        self._stub = pb_grpc.RouterStub(self._channel)
        logger.info("gateway uses the router at %s", self.address)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def generate(self, request: pb.GenerateRequest, http_request: Request) -> RouterCall:
        """Starts `Router.Generate`; the caller must `close()` the returned call."""
        if self._stub is None:
            raise router_unavailable("the gateway is not started")
        return RouterCall(self._stub.Generate(request), http_request)

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """`Router.Tokenize`; raises `OpenAIError` for an invalid request or a failed call."""
        response = await self._unary("Tokenize", request)
        if response.HasField("error"):
            raise from_proto_error(response.error)
        return response

    async def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        """`Router.Detokenize`; raises `OpenAIError` for an invalid request or a failed call."""
        response = await self._unary("Detokenize", request)
        if response.HasField("error"):
            raise from_proto_error(response.error)
        return response

    async def _unary(self, method: str, request):
        if self._stub is None:
            raise router_unavailable("the gateway is not started")
        try:
            return await getattr(self._stub, method)(request, timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def health(self) -> pb.HealthResponse:
        """The router's health; raises `OpenAIError` (503) when it cannot be reached."""
        if self._stub is None:
            raise router_unavailable("the gateway is not started")
        try:
            return await self._stub.Health(pb.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise router_unavailable(exc.details() or exc.code().name) from exc


class RouterCall:
    """One `Router.Generate` stream bound to one HTTP request."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, http_request: Request) -> None:
        self._call = call
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
        self._watcher.add_done_callback(self._on_disconnect)

    @property
    def client_gone(self) -> bool:
        return self._watcher.done() and not self._watcher.cancelled()

    async def chunks(self) -> AsyncIterator[pb.GenerateChunk]:
        """Yields the router's chunks.

        Raises `OpenAIError` for an error chunk or a failed call, and `ClientGone` once the
        client has disconnected (the call is already cancelled then).
        """
        try:
            async for chunk in self._call:
                if chunk.HasField("error"):
                    raise from_proto_error(chunk.error)
                yield chunk
        except asyncio.CancelledError:
            if self.client_gone and not _task_cancelling():
                raise ClientGone() from None
            raise
        except grpc.aio.AioRpcError as exc:
            if self.client_gone:
                raise ClientGone() from None
            raise from_rpc_error(exc) from exc

    def close(self) -> None:
        """Cancels the call if it is still running (a no-op after a normal end)."""
        self._watcher.cancel()
        self._call.cancel()

    def _on_disconnect(self, watcher: asyncio.Future) -> None:
        if not watcher.cancelled() and self._call.cancel():
            logger.debug("client disconnected; cancelled its router call")


async def _wait_for_disconnect(http_request: Request) -> None:
    """Returns when the client goes away. The body must have been read already."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


def _task_cancelling() -> bool:
    """Whether the running task itself is being cancelled (not just the call under it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling and cancelling())
