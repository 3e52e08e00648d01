"""Hostile input against a live stack: over 2,000 generated requests, then a health check.

Hypothesis strategies (`fuzz_strategies.py`) build the requests from the gateway's request
models (router/openai_schema.py) and break them: wrong types, huge, negative and non-finite
numbers, deep nesting, unknown fields, every role, tool schemas of odd shapes, broken `data:`
URLs, invalid UTF-8, truncated JSON, enormous strings under and over the body limit.
(Schemathesis would install, but the gateway publishes no OpenAPI schema, since its handlers read
raw bodies, and the byte-level breakage here is not expressible in a schema.)

Every answer must be below 500 and, when it is an error, an OpenAI error body; a 200 must be a
well-formed completion or event stream, without an error event. Afterwards the stack still
answers, no process was restarted, every page on every worker is free and no image is pinned.
Generating requests ask for one or two tokens, so most of the time goes to 4xx answers; the
module takes about three and a half minutes on two cores. `pytest -s` prints the status
histogram. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from fuzz_strategies import (
    BARE_NUMBERS,
    BYTE_MUTATIONS,
    CHAT_BODY,
    COMPLETION_BODY,
    DETOKENIZE_BODY,
    INVALID_UTF8,
    MODEL,
    ODD_TEXT,
    PART,
    TOKENIZE_BODY,
    VALID_BODY,
    bounded,
    well_formed_chats,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from image_utils import data_url, png_bomb
from stack_utils import start_stack

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc

CONTEXT = 1024  # long prompts are refused quickly; pages always suffice for what is accepted
BODY_LIMIT = 32 * 1024 * 1024  # the gateway's default
BUDGET_S = 480.0  # every request of the module must have been sent by then
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERROR_KEYS = {"message", "type", "param", "code"}


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: CI stays deterministic
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows its request
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Fuzz:
    base_url: str
    client: httpx.Client
    deadline: float
    statuses: Counter = field(default_factory=Counter)

    def send(self, path: str, content: bytes, method: str = "POST", **headers: str):
        assert time.monotonic() < self.deadline, "the fuzzing ran past its time budget"
        headers = {"content-type": "application/json", **headers}
        response = self.client.request(method, path, content=content, headers=headers)
        check_answer(response, has_body=method != "HEAD")
        streamed_error = response.status_code == 200 and b'data: {"error"' in response.content
        self.statuses[(path, response.status_code, "error event" if streamed_error else "")] += 1
        return response

    def post(self, path: str, body) -> httpx.Response:
        return self.send(path, json.dumps(body, allow_nan=True).encode())


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, context_length=CONTEXT)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def pids(stack) -> dict[str, int]:
    return {c.name: c.process.pid for c in stack.children}


@pytest.fixture(scope="module")
def fuzz(stack, pids):
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield Fuzz(stack.base_url, client, time.monotonic() + BUDGET_S)


# ---------------------------------------------------------------- answer checks


def check_answer(response: httpx.Response, has_body: bool = True) -> None:
    status = response.status_code
    assert status < 500, (status, response.text[:2000])
    if not has_body or 300 <= status < 400:  # a redirect: `/v1/models/` -> `/v1/models`
        return
    if status >= 400:
        assert_error_body(response.json())
        return
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        check_event_stream(response.text)
    elif kind.startswith("application/json"):
        assert isinstance(response.json(), dict)
    else:  # /metrics
        assert kind.startswith("text/plain"), kind


def assert_error_body(body) -> None:
    error = body["error"]
    assert set(error) == ERROR_KEYS, body
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def check_event_stream(text: str) -> None:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events and events[-1] == "[DONE]", text[-500:]
    for event in events[:-1]:
        payload = json.loads(event)
        assert "error" not in payload, payload  # a stream that failed after it started
        assert isinstance(payload["choices"], list)


# ---------------------------------------------------------------- generated requests


@fuzz_settings(450)
@given(body=CHAT_BODY)
def test_generated_chat_requests(fuzz, body):
    fuzz.post(CHAT, bounded(body))


@fuzz_settings(150)
@given(body=well_formed_chats())
def test_well_formed_chats_of_odd_content(fuzz, body):
    fuzz.post(CHAT, body)


@fuzz_settings(250)
@given(body=COMPLETION_BODY)
def test_generated_completion_requests(fuzz, body):
    fuzz.post(COMPLETIONS, bounded(body))


@fuzz_settings(200)
@given(path=st.sampled_from(["/tokenize", "/detokenize"]), data=st.data())
def test_generated_tokenizer_requests(fuzz, path, data):
    fuzz.post(path, data.draw(TOKENIZE_BODY if path == "/tokenize" else DETOKENIZE_BODY))


@fuzz_settings(150)
@given(parts=st.lists(PART, min_size=1, max_size=3), text=ODD_TEXT)
def test_generated_image_requests(fuzz, parts, text):
    content = [{"type": "text", "text": text}, *parts]
    fuzz.post(CHAT, {"messages": [{"role": "user", "content": content}], "max_tokens": 1})


@fuzz_settings(700)
@given(
    path=st.sampled_from([CHAT, CHAT, COMPLETIONS, "/tokenize", "/detokenize"]),
    mutation=st.sampled_from(sorted(BYTE_MUTATIONS)),
    position=st.integers(0, 10**6),
    junk=st.binary(max_size=64) | st.sampled_from(BARE_NUMBERS + INVALID_UTF8),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"]),
)
def test_mutated_bodies(fuzz, path, mutation, position, junk, content_type):
    body = BYTE_MUTATIONS[mutation](VALID_BODY, position, junk)
    fuzz.send(path, body, **{"content-type": content_type})


@fuzz_settings(120)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(["/v1/models", "/health", "/health/ready", "/metrics", "/v1/chat",
                          "/v1/chat/completions/", "/v1/embeddings", "/%00", "/..%2f..%2fetc",
                          "/v1/models/" + "x" * 2000, "/docs", "/openapi.json"]),
    body=st.binary(max_size=32),
)  # fmt: skip
def test_methods_and_paths(fuzz, method, path, body):
    fuzz.send(path, body, method=method)


# ---------------------------------------------------------------- enormous bodies

MB = 1024 * 1024


def _user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def _image(url: str) -> dict:
    return _user([{"type": "image_url", "image_url": url}])


# Built when used: some take seconds or tens of megabytes.
HUGE_CASES = {
    "2 MB content": lambda: (CHAT, _user("ab " * (MB * 2 // 3))),
    "8 MB content": lambda: (CHAT, _user("x" * 8 * MB)),
    "just under the limit": lambda: (CHAT, _user("y" * (BODY_LIMIT - 200))),
    "just over the limit": lambda: (CHAT, _user("y" * BODY_LIMIT)),
    "4 MB tool description": lambda: (CHAT, {**_user("x"), "tools": [
        {"type": "function", "function": {"name": "f", "description": "d " * 2 * MB}}]}),
    "1 MB stop string": lambda: (CHAT, {**_user("x"), "stop": "s" * MB}),
    "10k stop strings": lambda: (CHAT, {**_user("x"), "stop": ["ab"] * 10**4}),
    "20k messages": lambda: (CHAT, {"messages": [{"role": "user", "content": "x"}] * 20000}),
    "3 MB broken base64": lambda: (CHAT, _image("data:image/png;base64," + "A" * 3 * MB + "!")),
    "decompression bomb": lambda: (CHAT, _image(data_url(png_bomb(30000, 30000)))),
    "n=128": lambda: (CHAT, {**_user("x"), "n": 128}),
    "1 MB completion prompt": lambda: (COMPLETIONS, {"prompt": "z " * (MB // 2)}),
    "100k token ids": lambda: (COMPLETIONS, {"prompt": [5] * 100_000}),
    "1 MB tokenize": lambda: ("/tokenize", {"prompt": "w" * MB}),
    "200k detokenize": lambda: ("/detokenize", {"tokens": [7] * 200_000}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HUGE_CASES))
def test_enormous_bodies(fuzz, case):
    path, body = HUGE_CASES[case]()
    body = {**body, "max_tokens": 1} if path in (CHAT, COMPLETIONS) else body
    response = fuzz.post(path, body)
    if case == "just over the limit":
        assert response.status_code == 413


def test_enormous_bodies_over_the_wire(fuzz):
    """Over the limit without a declared length (chunked), and a huge declared length alone:
    413 either way, read by the client (the gateway discards the rest of the body)."""
    pieces = (b"x" * MB for _ in range(BODY_LIMIT // MB + 2))
    response = fuzz.client.post(CHAT, content=pieces, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert_error_body(response.json())

    port = int(fuzz.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000000000000000\r\n\r\n{}")  # fmt: skip
        answer = b""
        while not answer.endswith(b"}}"):
            piece = sock.recv(65536)
            assert piece, answer
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert_error_body(json.loads(answer.split(b"\r\n\r\n", 1)[1]))
    fuzz.statuses[(CHAT, 413, "")] += 2


# ---------------------------------------------------------------- the stack afterwards


def _worker_status(stack, name: str):
    address = f"127.0.0.1:{stack.child(name).port}"
    with grpc.insecure_channel(address) as channel:
        if name.startswith("vision"):
            return vpb_grpc.VisionWorkerStub(channel).Status(vpb.VisionStatusRequest(), timeout=5)
        stub = pb_grpc.DecodeWorkerStub if name.startswith("decode") else pb_grpc.PrefillWorkerStub
        return stub(channel).Status(pb.StatusRequest(), timeout=5)


def test_stack_is_intact_afterwards(fuzz, stack, pids):
    total = sum(fuzz.statuses.values())
    histogram = Counter()
    for (_path, status, note), count in fuzz.statuses.items():
        histogram[f"{status}{' ' + note if note else ''}"] += count
    print(f"\nfuzz: {total} requests; statuses {dict(sorted(histogram.items()))}")
    for (path, status, note), count in sorted(fuzz.statuses.items()):
        print(f"  {path[:40]} {status} {note}: {count}")
    assert total >= 2000

    answer = fuzz.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 2})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    assert {c.name: c.process.pid for c in stack.children} == pids
    assert all(c.poll() is None for c in stack.children)

    deadline = time.monotonic() + 5.0
    while True:
        workers = [_worker_status(stack, name) for name in ("decode-0", "prefill-0")]
        pages = {w.worker_id: (w.num_free_pages, w.num_total_pages) for w in workers}
        pinned = _worker_status(stack, "vision-0").num_pinned_images
        if all(free == total for free, total in pages.values()) and pinned == 0:
            break
        assert time.monotonic() < deadline, (pages, pinned)
        time.sleep(0.1)
    print(f"pages after fuzzing: {pages}; pinned images: {pinned}")
