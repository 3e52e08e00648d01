"""The gateway's errors against a scripted router (`gateway_harness`): invalid and malformed
requests, slow clients, limits, keys, router failures and client disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from gateway_harness import (
    API_KEY,
    BODY_LIMIT,
    CHAT,
    HELLO,
    MODEL,
    GatewayThread,
    assert_openai_error,
    chat_body,
    chunk,
    client,
    delta,
    error_chunk,
    post,
    sse_payloads,
)

from router.gateway import create_app

# ---------------------------------------------------------------- errors


def user(content):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": user(5)}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": user([{"type": "audio"}])}, "messages[0].content[0]"),
        ({"messages": user([{"type": "image_url"}])}, "messages[0].content[0]"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "response_format",
        ),
    ],
)
def test_invalid_chat_requests_are_400_naming_the_field(router, gateway, fields, param):
    error = assert_openai_error(post(gateway, chat_body(**fields)), 400, param)
    assert error["type"] == "invalid_request_error"
    assert router.requests == []


LONE_SURROGATE = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
# Valid JSON nested deeper than the gateway's limit (the router's renderer would recurse).
DEEP = json.loads("[" * 300 + "]" * 300)
DEEP_TOOLS = json.dumps(
    chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"x": DEEP}}}])
).encode()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"messages": NaN}', b"\xff\xfe", b"[" * 100_000, LONE_SURROGATE,
     DEEP_TOOLS],
)  # fmt: skip
def test_malformed_bodies_are_400(router, gateway, content):
    response = httpx.post(gateway + CHAT, content=content, timeout=30)
    assert_openai_error(response, 400)
    assert router.requests == []


def _answer_then_close(port: int, sent: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        answer = b""
        while piece := sock.recv(4096):  # until the gateway closes the connection
            answer += piece
    return answer


def test_slow_head_and_slow_body_get_408_and_the_connection_closes(router):
    app = create_app(router.address, MODEL, body_timeout=0.5)
    partial = b"POST /v1/chat/completions HTTP/1.1\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with GatewayThread(app, head_timeout=0.5) as served:
        partial_head = _answer_then_close(served.port, partial)
        partial_body = _answer_then_close(served.port, head + b"{")
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            health = b""
            while not health.endswith(b'{"status":"ok"}'):
                health += sock.recv(4096)
            assert health.startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle on a kept-alive connection: no deadline yet
            sock.sendall(partial)  # a head begins: now it has 0.5 s
            kept_alive = b""
            while piece := sock.recv(4096):
                kept_alive += piece
    for answer in (partial_head, partial_body, kept_alive):
        assert answer.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout"
    assert router.requests == []


def test_malformed_http_is_an_openai_400(gateway):
    port = int(gateway.rsplit(":", 1)[1])
    answer = _answer_then_close(port, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_completions_reject_batches(gateway):
    body = {"model": MODEL, "prompt": ["one", "two"]}
    assert_openai_error(post(gateway, body, "/v1/completions"), 400, "prompt")


def test_unknown_model_is_404(router, gateway):
    error = assert_openai_error(post(gateway, chat_body(model="gpt-4o")), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="gpt-4o", messages=HELLO)


def test_api_key_is_required_except_on_health(router, secured):
    for path in ("/v1/models", "/health/ready"):
        assert_openai_error(httpx.get(secured + path), 401)
    wrong = post(secured, chat_body(), headers={"Authorization": "Bearer nope"})
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(secured + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(secured, "sk-wrong").models.list()
    answer = client(secured, API_KEY).chat.completions.create(model=MODEL, messages=HELLO)
    assert answer.choices[0].message.content == "Hello!"
    assert router.requests


def test_body_over_limit_is_413(router, secured):
    body = chat_body(messages=user("x" * BODY_LIMIT))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert_openai_error(post(secured, body, headers=auth), 413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(body).encode()

    response = httpx.post(secured + CHAT, content=chunked(), headers=auth)
    assert_openai_error(response, 413)
    assert router.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_router_error_status_passes_through(router, gateway, stream):
    too_long = error_chunk(400, "prompt is too long", "messages", "context_length_exceeded")
    router.script = [too_long]
    body = chat_body(stream=stream)
    error = assert_openai_error(post(gateway, body), 400)
    assert (error["message"], error["param"]) == ("prompt is too long", "messages")
    assert error["code"] == "context_length_exceeded"

    router.script = [error_chunk(503, "no decode worker is available")]
    busy = post(gateway, body)
    assert_openai_error(busy, 503)
    assert busy.headers["retry-after"] == "1"
    router.script[0].error.retry_after_seconds = 7  # the router's hint wins
    assert post(gateway, body).headers["retry-after"] == "7"


def test_unreachable_router_is_503_with_retry_after(orphan):
    for response in (post(orphan, chat_body()), httpx.get(orphan + "/health/ready")):
        assert_openai_error(response, 503)
        assert response.headers["retry-after"] == "1"
    with pytest.raises(openai.APIStatusError) as raised:
        client(orphan).chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert raised.value.status_code == 503
    assert httpx.get(orphan + "/health").status_code == 200


def test_error_after_stream_started_ends_with_error_event(router, gateway):
    router.script = [chunk(delta(content="Hel")), error_chunk(500, "decode worker lost")]
    payloads = sse_payloads(gateway, chat_body(stream=True))
    assert payloads[-2]["error"]["message"] == "decode worker lost" and payloads[-1] == "[DONE]"
    router.script = [chunk(delta(content="Hel")), error_chunk(500, "decode worker lost")]
    with pytest.raises(openai.APIError, match="decode worker lost"):
        list(client(gateway).chat.completions.create(model=MODEL, messages=HELLO, stream=True))


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_router_call(router, gateway, stream):
    router.script = [chunk(delta(content="tok")) for _ in range(400)]
    router.delay_s = 0.05
    body = chat_body(stream=stream)
    if stream:
        with httpx.stream("POST", gateway + CHAT, json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway + CHAT, json=body, timeout=0.5)
    assert router.cancelled.wait(timeout=5), "the router call was not cancelled"
