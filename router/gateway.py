"""The OpenAI-compatible HTTP gateway in front of the router.

HTTP only: it authenticates, enforces the body limit, validates the OpenAI request, translates it
to a `GenerateRequest`, and turns the router's `GenerateChunk` stream into a JSON answer or
server-sent events. It holds no model state. Endpoints:

- `POST /v1/chat/completions`, `POST /v1/completions`: streaming and not;
- `POST /tokenize`, `POST /detokenize`: vLLM's shapes, answered by the router (which holds the
  template and the tokenizer);
- `GET /v1/models`: the one served model;
- `GET /health`: 200 while this process is alive (no key needed);
- `GET /health/ready`: 200 when the router says it is ready, else 503.

Every failure is an OpenAI error body (see `router.errors`). A streaming request reads the
router's first chunk before answering, so an error the router reports up front (prompt too long,
no worker) keeps its HTTP status; a failure after that ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from proto import kimiserve_pb2 as pb
from router.errors import (
    RETRY_AFTER_SECONDS,
    ClientGone,
    OpenAIError,
    from_validation_errors,
    install_error_handlers,
    invalid_request,
)
from router.gateway_http import server_config
from router.gateway_metrics import add_metrics_route
from router.openai_schema import (
    ApiRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from router.responses import DONE_EVENT, ChatStreamWriter, Collector, CompletionStreamWriter, sse
from router.router_client import RouterCall, RouterClient
from router.translate import (
    chat_to_proto,
    completion_to_proto,
    detokenize_to_proto,
    tokenize_to_proto,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "moonshotai/Kimi-K2.5"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Seconds a client may pause while sending its body before it gets 408 (nginx's
# client_body_timeout is the same idea, at 60 s).
DEFAULT_BODY_TIMEOUT_S = 30.0
# Deepest JSON nesting a body may have. Real tool schemas stay far below; deeper ones would only
# exhaust the Python stack of whoever walks them (the router's template renderer does).
MAX_JSON_DEPTH = 128
OWNED_BY = "moonshotai"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

RequestT = TypeVar("RequestT", bound=ApiRequest)


@dataclass(frozen=True)
class GatewayState:
    """What the handlers need, fixed when the app is created."""

    client: RouterClient
    model_name: str
    max_body_bytes: int
    body_timeout: float
    created: int


def create_app(
    router_address: str,
    served_model_name: str = DEFAULT_MODEL_NAME,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The gateway app. Its lifespan opens the router channel; nothing connects before that.

    With `api_key`, every endpoint except `/health` needs `Authorization: Bearer <api_key>`.
    A client that sends nothing of its body for `body_timeout` seconds gets 408.
    """
    state = GatewayState(
        RouterClient(router_address, max_body_bytes),
        served_model_name,
        max_body_bytes,
        body_timeout,
        int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.client.start()
        logger.info("gateway serving %s", served_model_name)
        yield
        await state.client.close()

    app = FastAPI(
        title="kimiserve gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = state
    install_error_handlers(app)

    protected = APIRouter(dependencies=[Depends(_auth_dependency(api_key))])
    protected.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    protected.add_api_route("/v1/completions", completions, methods=["POST"])
    protected.add_api_route("/tokenize", tokenize, methods=["POST"])
    protected.add_api_route("/detokenize", detokenize, methods=["POST"])
    protected.add_api_route("/v1/models", list_models, methods=["GET"])
    protected.add_api_route("/health/ready", ready, methods=["GET"])
    add_metrics_route(protected, router_address)
    app.include_router(protected)
    app.add_api_route("/health", alive, methods=["GET"])
    return app


def run_gateway(
    host: str,
    port: int,
    router_address: str,
    served_model_name: str = DEFAULT_MODEL_NAME,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serves the gateway until interrupted, with the same HTTP settings as `gateway_main`."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    app = create_app(router_address, served_model_name, api_key, max_body_bytes)
    uvicorn.Server(server_config(app, host=host, port=port)).run()


# ---------------------------------------------------------------- auth and body


def _auth_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode() if api_key else None

    async def check_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compare in constant time whatever the scheme, so timing says nothing about the key.
        matches = hmac.compare_digest(token.strip().encode(), expected)
        if not (matches and scheme.lower() == "bearer"):
            raise OpenAIError(401, "missing or invalid API key", code="invalid_api_key")

    return check_key


async def _read_request(request: Request, model: type[RequestT]) -> RequestT:
    """Reads, size-checks, parses and validates a JSON body; every failure is a 4xx."""
    state: GatewayState = request.app.state.gateway
    body = await _read_body(request, state.max_body_bytes, state.body_timeout)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object")
    if _nests_deeper_than(data, MAX_JSON_DEPTH):
        raise invalid_request(f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from exc
    parsed.check()
    if parsed.model is not None and parsed.model != state.model_name:
        message = (
            f"the model {parsed.model!r} does not exist; this server serves {state.model_name!r}"
        )
        raise OpenAIError(404, message, param="model", code="model_not_found")
    return parsed


async def _read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The whole body: 413 past `max_bytes`, 408 after `timeout` seconds without a byte,
    `ClientGone` when the client leaves while sending it."""
    too_large = OpenAIError(
        413, f"the request body exceeds {max_bytes} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    pieces = request.stream()
    try:
        while (piece := await asyncio.wait_for(anext(pieces, None), timeout)) is not None:
            body += piece
            if len(body) > max_bytes:
                raise too_large
    except asyncio.TimeoutError:
        message = f"the request body did not arrive: nothing was received for {timeout:g} s"
        raise OpenAIError(408, message, code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone() from None
    finally:
        await pieces.aclose()
    return bytes(body)


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest more than `limit` levels (iteratively, so a
    deep body cannot exhaust the stack here)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        pending.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------- generation endpoints


async def chat_completions(request: Request) -> Response:
    parsed = await _read_request(request, ChatCompletionRequest)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    call = _start(request, chat_to_proto(parsed, request_id))
    meta = (request_id, int(time.time()), request.app.state.gateway.model_name)
    n, logprobs = parsed.n or 1, parsed.logprobs_requested
    if not parsed.stream:
        collector = await _collect(call, n, logprobs)
        return JSONResponse(collector.chat_completion(*meta))
    writer = ChatStreamWriter(*meta, include_usage=parsed.include_usage, logprobs=logprobs)
    return await _stream(call, writer, writer.start(n))


async def completions(request: Request) -> Response:
    parsed = await _read_request(request, CompletionRequest)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    call = _start(request, completion_to_proto(parsed, request_id))
    meta = (request_id, int(time.time()), request.app.state.gateway.model_name)
    echo = parsed.single_prompt if parsed.echo else ""
    n, logprobs = parsed.n or 1, parsed.logprobs_requested
    if not parsed.stream:
        collector = await _collect(call, n, logprobs)
        return JSONResponse(collector.text_completion(*meta, echo=echo))
    writer = CompletionStreamWriter(*meta, include_usage=parsed.include_usage, logprobs=logprobs)
    return await _stream(call, writer, writer.start(n, echo))


def _start(request: Request, generate: pb.GenerateRequest) -> RouterCall:
    logger.debug("request %s: n=%d", generate.request_id, generate.n)
    return request.app.state.gateway.client.generate(generate, request)


async def _collect(call: RouterCall, n: int, logprobs: bool) -> Collector:
    collector = Collector(n, logprobs)
    try:
        async for chunk in call.chunks():
            collector.add(chunk)
    finally:
        call.close()
    return collector


async def _stream(
    call: RouterCall, writer: ChatStreamWriter | CompletionStreamWriter, opening: list[bytes]
) -> Response:
    """Waits for the router's first chunk (so early errors keep their status), then streams."""
    chunks = call.chunks()
    try:
        first = await anext(chunks, None)
    except BaseException:
        call.close()
        raise
    events = _events(call, chunks, first, writer, opening)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    call: RouterCall,
    chunks: AsyncIterator[pb.GenerateChunk],
    first: pb.GenerateChunk | None,
    writer: ChatStreamWriter | CompletionStreamWriter,
    opening: list[bytes],
) -> AsyncIterator[bytes]:
    try:
        for event in opening:
            yield event
        if first is not None:
            for event in writer.events(first):
                yield event
        async for chunk in chunks:
            for event in writer.events(chunk):
                yield event
        for event in writer.finish():
            yield event
    except OpenAIError as exc:
        logger.info("stream failed after it started: %s", exc.message)
        yield sse(exc.body())
        yield DONE_EVENT
    except ClientGone:
        logger.debug("client left mid-stream")
    finally:
        call.close()


# ---------------------------------------------------------------- tokenizer endpoints


async def tokenize(request: Request) -> dict[str, Any]:
    parsed = await _read_request(request, TokenizeRequest)
    answer = await request.app.state.gateway.client.tokenize(tokenize_to_proto(parsed))
    body: dict[str, Any] = {
        "count": len(answer.tokens),
        "max_model_len": answer.max_model_len,
        "tokens": list(answer.tokens),
        "token_strs": list(answer.token_strs) if parsed.return_token_strs else None,
    }
    if parsed.return_text:
        body["text"] = answer.text
    return body


async def detokenize(request: Request) -> dict[str, Any]:
    parsed = await _read_request(request, DetokenizeRequest)
    answer = await request.app.state.gateway.client.detokenize(detokenize_to_proto(parsed))
    return {"prompt": answer.prompt}


# ---------------------------------------------------------------- models and health


async def list_models(request: Request) -> dict[str, Any]:
    state: GatewayState = request.app.state.gateway
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": OWNED_BY,
    }
    return {"object": "list", "data": [card]}


async def alive() -> dict[str, str]:
    return {"status": "ok"}


async def ready(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    health = await state.client.health()
    pools = {p.role: sum(w.state == "ready" for w in p.workers) for p in health.pools}
    body = {"status": "ready" if health.ready else "not_ready", "ready_workers": pools}
    if health.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
