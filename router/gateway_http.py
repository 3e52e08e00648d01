"""The gateway's HTTP server: uvicorn (h11) with every wait on a client bounded.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`), but nothing bounds
the time a client takes to send a request head once it started one, or on a new connection: a
client that sends its headers byte by byte, or nothing at all, would hold its connection forever.
`GatewayProtocol` gives a request head `head_timeout` seconds from the connection's opening (or
from its first byte on a kept-alive connection), then answers 408 and closes. It also answers
malformed HTTP with an OpenAI error body instead of uvicorn's plain text. The app bounds pauses
while a body arrives (`create_app(body_timeout)`).

Idle kept-alive connections stay open `KEEP_ALIVE_S` seconds, longer than HTTP clients keep them
in their pools (httpx and so the `openai` package: 5 s, aiohttp: 15 s); at uvicorn's default of
5 s the server sometimes closed a connection just as a client reused it, and that request failed.

A client that stops reading a streaming answer holds only its own connection: generation goes on
in the workers and frees its pages at the end, the router buffers the chunks, and everything of
the request is released when the client disconnects.

Limitation: a client that stays connected without reading keeps its unsent events (at most
`max_tokens` of them) buffered in the router and the gateway until it disconnects, since nothing
times out a stalled write.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from router.errors import OpenAIError, invalid_request

logger = logging.getLogger(__name__)

DEFAULT_HEAD_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 75  # nginx's default; above the pool expiry of common clients
GRACEFUL_SHUTDOWN_S = 5
MAX_HEAD_BYTES = 64 * 1024  # larger request heads are a 400 (h11 counts the whole head)


class GatewayProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on what a client still owes, and JSON errors.

    One timer per connection, running while the server waits for a request head (from the
    connection's opening, or from the head's first byte on a kept-alive connection), or for the
    rest of a body answered before it ended (413: uvicorn reads and discards it, so the client
    can read its answer). Either way the client has `head_timeout` seconds.
    """

    def __init__(self, *args, head_timeout: float = DEFAULT_HEAD_TIMEOUT_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = ""  # "head", "rest of body" or "" (nothing owed)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # this cancels uvicorn's keep-alive timer
        if self.transport.is_closing():
            return
        head_pending = self.conn.their_state is h11.IDLE
        if self._awaiting == "head" and not head_pending:
            self._cancel()  # the head is complete; the app bounds the body
        elif self._awaiting != "head" and head_pending:
            self._arm("head")  # a head began on a kept-alive connection

    def on_response_complete(self) -> None:
        super().on_response_complete()  # this arms uvicorn's keep-alive timer
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self._arm("rest of body")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = invalid_request(f"malformed HTTP request: {msg}").body()
        try:
            for event in _json_response(400, b"Bad Request", body):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started
            pass
        self.transport.close()

    def _arm(self, awaiting: str) -> None:
        self._cancel()
        self._awaiting = awaiting
        self._timer = self.loop.call_later(self._head_timeout, self._on_timeout)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._awaiting = None, ""

    def _on_timeout(self) -> None:
        awaiting, self._timer, self._awaiting = self._awaiting, None, ""
        if self.transport.is_closing():
            return
        if awaiting == "head" and self.conn.their_state is h11.IDLE:
            # h11 cannot answer a request it has not seen, so the bytes are written directly.
            message = f"the request head was not received within {self._head_timeout:g} s"
            body = json.dumps(OpenAIError(408, message, code="request_timeout").body()).encode()
            head = (
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
            )
            self.transport.write(head + body)
        logger.debug("closing a connection that owed its %s for %g s", awaiting, self._head_timeout)
        self.transport.close()


def _json_response(status: int, reason: bytes, body: dict) -> list:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    return [
        h11.Response(status_code=status, headers=headers, reason=reason),
        h11.Data(data=data),
        h11.EndOfMessage(),
    ]


def server_config(
    app,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "info",
    head_timeout: float = DEFAULT_HEAD_TIMEOUT_S,
) -> uvicorn.Config:
    """The gateway's uvicorn settings: h11 with `GatewayProtocol`, no access log."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=functools.partial(GatewayProtocol, head_timeout=head_timeout),
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
