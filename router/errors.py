"""OpenAI-shaped errors for the HTTP gateway.

Every failure the gateway answers has the body `{"error": {"message", "type", "param", "code"}}`
and a 4xx/5xx status: validation problems are 400 (never FastAPI's 422), a router error chunk keeps
the router's status, and an unreachable router is 503 with `Retry-After`. Bad input never becomes
a 500; only a bug in the gateway itself does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from proto import kimiserve_pb2 as pb

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# nginx's code for "client closed the request"; nobody reads it, but the access log shows it.
CLIENT_CLOSED_STATUS = 499
# Loc segments pydantic adds for union members ("str", "list[ContentPart]", ...): not field names.
_TYPE_SEGMENTS = {"str", "int", "float", "bool", "dict", "list", "none"}
_RETRYABLE_STATUSES = {429, 503}
# A client that stalled mid-body cannot send another request on its connection. (413 keeps the
# connection so the client reads the answer; the server bounds the discarded rest.)
_CLOSING_STATUSES = {408}


class OpenAIError(Exception):
    """A request failure to answer with an OpenAI error body and `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int = 0,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds; 0: the default for a retryable status

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def headers(self) -> dict[str, str]:
        if self.retry_after > 0 or self.status in _RETRYABLE_STATUSES:
            return {"Retry-After": str(self.retry_after or RETRY_AFTER_SECONDS)}
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status in _CLOSING_STATUSES:
            return {"Connection": "close"}
        return {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


class ClientGone(Exception):
    """The HTTP client disconnected; its router call has been cancelled."""


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def router_unavailable(detail: str) -> OpenAIError:
    message = f"the router is unavailable ({detail}); retry shortly"
    return OpenAIError(503, message, type="service_unavailable_error", code="router_unavailable")


def from_proto_error(error: pb.Error) -> OpenAIError:
    """The router's error, with its status kept when it is a valid 4xx/5xx and its
    `retry_after_seconds` as the `Retry-After` header."""
    status = error.http_status
    if not 400 <= status <= 599:
        logger.warning("router sent an error with status %d; answering 502", status)
        status = 502
    return OpenAIError(
        status,
        error.message or "the request failed in the router",
        type=error.type or ("invalid_request_error" if status < 500 else "server_error"),
        param=error.param or None,
        code=error.code or None,
        retry_after=max(error.retry_after_seconds, 0),
    )


def from_rpc_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """A failed gRPC call to the router (not an error chunk: the call itself broke)."""
    code, detail = exc.code(), exc.details() or exc.code().name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return router_unavailable(detail)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return invalid_request(detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpenAIError(504, f"the router timed out: {detail}", type="server_error")
    logger.warning("router call failed: %s %s", code.name, detail)
    return OpenAIError(502, f"the router failed: {code.name}: {detail}", type="server_error")


def param_path(loc: Sequence[int | str]) -> str:
    """`("messages", 0, "content")` -> `messages[0].content`, without pydantic's union tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _TYPE_SEGMENTS and "[" not in part and part.islower() and part != "body":
            path += f".{part}" if path else part
    return path


def from_validation_errors(errors: Iterable[dict[str, Any]]) -> OpenAIError:
    """One 400 naming the most specific field that failed (pydantic reports every union member)."""
    found = [(param_path(e.get("loc", ())), _clean_message(e.get("msg", ""))) for e in errors]
    if not found:
        return invalid_request("invalid request")
    param = max((p for p, _ in found), key=len)
    messages = list(dict.fromkeys(m for p, m in found if p == param))
    text = " or ".join(messages)
    return invalid_request(f"{param}: {text}" if param else text, param=param or None)


def _clean_message(message: str) -> str:
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def install_error_handlers(app: FastAPI) -> None:
    """Routes every exception the app can raise to an OpenAI-shaped body."""

    async def on_openai_error(request: Request, exc: OpenAIError) -> Response:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(exc.errors()).response()

    async def on_pydantic(request: Request, exc: ValidationError) -> Response:
        return from_validation_errors(exc.errors()).response()

    async def on_http(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        error = OpenAIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        error = OpenAIError(500, "internal error in the gateway", type="server_error")
        return error.response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_pydantic)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
