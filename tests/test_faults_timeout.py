"""Requests past the router's deadline (`--request-timeout`, DESIGN.md section 9): the request is
aborted at every stage like a client that left, the client gets a 504 (an OpenAI error body, or
an error event that ends the stream), every page is free again within a second, and the requests
streaming meanwhile finish with the same tokens as when alone. The stack's decode worker holds
fewer tokens (128 pages of 16) than its context (4,096), so a prompt that can never fit is here
too: a 400 at once, not a wait for pages."""

from __future__ import annotations

import json
import signal
import time

import grpc
import httpx
import openai
import pytest
from image_utils import data_url, natural_photo_jpeg
from stack_utils import router_address, start_stack
from test_faults import (
    MODEL,
    _chat,
    _check_short_streams,
    _client,
    _short_streams,
    _status,
    _until_served,
)

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc

TIMEOUT = 3.0
NUM_PAGES = 128
LONG = {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}  # ~20 s at the tiny model's pace


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, context_length=4096, num_pages=NUM_PAGES,
                        request_timeout=TIMEOUT)  # fmt: skip
    yield stack
    stack.stop()


def _assert_idle(stack, within: float) -> float:
    """Waits until both workers have every page free and nothing running; the seconds it took."""
    started = time.monotonic()
    while True:
        decode, prefill = _status(stack, "decode-0"), _status(stack, "prefill-0")
        if (decode.num_free_pages == decode.num_total_pages and decode.num_running == 0
                and prefill.num_free_pages == prefill.num_total_pages):  # fmt: skip
            return time.monotonic() - started
        assert time.monotonic() - started < within, (decode, prefill)
        time.sleep(0.05)


def test_request_past_its_deadline_is_504_and_frees_every_page(stack):
    _until_served(stack)
    started = time.monotonic()
    others = _short_streams(stack, lambda: time.monotonic() < started + TIMEOUT / 2)
    with others as results, pytest.raises(openai.APIStatusError) as err:
        try:
            _chat(_client(stack), "tell me everything", **LONG)
        finally:
            elapsed = time.monotonic() - started
    took = _assert_idle(stack, within=1.0)
    assert err.value.status_code == 504
    assert err.value.body["code"] == "request_timeout"
    assert f"limit of {TIMEOUT:g} s (--request-timeout)" in err.value.body["message"]
    assert TIMEOUT <= elapsed < TIMEOUT + 1.5
    print(f"504 after {elapsed:.2f} s; pages free {took:.2f} s later")
    _check_short_streams(stack, results, at_least=2)


def test_streaming_request_past_its_deadline_ends_with_an_error_event(stack):
    _until_served(stack)
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": LONG["max_tokens"],
            "ignore_eos": True, "messages": [{"role": "user", "content": "tell me more"}]}  # fmt: skip
    started = time.monotonic()
    others = _short_streams(stack, lambda: time.monotonic() < started + TIMEOUT / 2)
    url = f"{stack.base_url}/v1/chat/completions"
    with others as results, httpx.stream("POST", url, json=body, timeout=30) as response:
        assert response.status_code == 200  # tokens flowed before the deadline
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
    took = _assert_idle(stack, within=1.0)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
    assert len(events) > 20  # the answer streamed until the deadline cut it
    assert TIMEOUT <= elapsed < TIMEOUT + 2.5  # the client reads a backlog of events at the end
    print(
        f"{len(events) - 2} events, then the error after {elapsed:.2f} s; pages free {took:.2f} s"
    )
    _check_short_streams(stack, results, at_least=2)


def test_timeout_while_the_vision_worker_encodes_unpins_the_images(stack):
    """The deadline passes while the (stopped) vision worker holds the Encode call: the client
    gets its 504, and the worker, once it runs again, drops what it encoded for nobody."""
    vision = stack.child("vision-0")
    image = {"type": "image_url", "image_url": {"url": data_url(natural_photo_jpeg(96, 64, 5),
                                                                "image/jpeg")}}  # fmt: skip
    vision.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            _chat(_client(stack), [{"type": "text", "text": "What is it?"}, image], max_tokens=4)
        elapsed = time.monotonic() - started
    finally:
        vision.signal(signal.SIGCONT)
    assert err.value.status_code == 504 and TIMEOUT <= elapsed < TIMEOUT + 1.5
    with grpc.insecure_channel(f"127.0.0.1:{vision.port}") as channel:
        stub = vpb_grpc.VisionWorkerStub(channel)
        deadline = time.monotonic() + 5.0
        while (status := stub.Status(vpb.VisionStatusRequest(), timeout=5)).num_pinned_images:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
    _assert_idle(stack, within=1.0)
    reply = _chat(_client(stack), [{"type": "text", "text": "What is it?"}, image], max_tokens=4)
    assert reply.usage.completion_tokens == 4  # the same image, now encoded in time


def test_grpc_deadline_of_a_router_caller_is_honoured(stack):
    """No OpenAI field sets a per-request limit (vLLM and SGLang have none); a gRPC caller of
    `Router.Generate` sets the standard gRPC deadline, and the request is aborted the same way."""
    _until_served(stack)
    request = pb.GenerateRequest(
        request_id="deadline-1",
        prompt="count to a thousand",
        sampling=pb.SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True),
    )
    num_chunks = 0
    channel = grpc.insecure_channel(router_address(stack))
    with channel, pytest.raises(grpc.RpcError) as err:
        for _ in pb_grpc.RouterStub(channel).Generate(request, timeout=1.0):
            num_chunks += 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and num_chunks > 10
    _assert_idle(stack, within=1.0)
    assert _chat(_client(stack), max_tokens=4).usage.completion_tokens == 4


def test_prompt_that_can_never_fit_is_400_at_once(stack):
    """Within the context length but over what a decode worker holds in all: no retry can
    succeed, so it is a 400 naming both numbers, not a 503 after the queue timeout."""
    _until_served(stack)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        _chat(_client(stack), "word " * 3000, max_tokens=4)  # ~3,040 tokens: 191 pages
    assert time.monotonic() - started < 2.0
    assert f"KV pages; a decode worker holds {NUM_PAGES}" in err.value.body["message"]
    _assert_idle(stack, within=1.0)
