"""Faults while serving (DESIGN.md section 9): over-long prompts, clients that leave, and workers
killed with SIGKILL. After each, free pages on every worker return to their start value and the
pool recovers when the worker is restarted."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import openai
import pytest
from stack_utils import start_stack

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc

MODEL = "moonshotai/Kimi-K2.5"
CONTEXT = 256


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, context_length=CONTEXT, kv_transfer_timeout=5.0)
    yield stack
    stack.stop()


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def _status(stack, name: str) -> pb.WorkerStatus:
    stub_class = (
        pb_grpc.DecodeWorkerStub if name.startswith("decode") else pb_grpc.PrefillWorkerStub
    )
    with grpc.insecure_channel(f"127.0.0.1:{stack.child(name).port}") as channel:
        return stub_class(channel).Status(pb.StatusRequest(), timeout=5)


def _assert_pages_back(stack, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while True:
        statuses = [_status(stack, name) for name in ("decode-0", "prefill-0")]
        if all(s.num_free_pages == s.num_total_pages for s in statuses):
            return
        assert time.monotonic() < deadline, [(s.worker_id, s.num_free_pages) for s in statuses]
        time.sleep(0.1)


def _chat(client, content="Hi", **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


def _until_served(stack, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _chat(_client(stack), max_tokens=2)
            return
        except openai.APIError:
            assert time.monotonic() < deadline, "the stack did not recover"
            time.sleep(0.2)


def test_k47_over_long_prompt_is_400_fast_and_reserves_nothing(stack):
    _chat(_client(stack), max_tokens=1)  # warm connections first: the figure is the rejection
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        _chat(_client(stack), "word " * 400, max_tokens=10)
    assert time.monotonic() - started < 1.0
    message = err.value.body["message"]
    assert f"maximum context length is {CONTEXT} tokens" in message
    _assert_pages_back(stack, within=0.0)


def test_k49_clients_that_disconnect_free_every_page(stack):
    def read_then_leave(stop_after: int) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": 200,
                "messages": [{"role": "user", "content": f"tell me {stop_after}"}]}  # fmt: skip
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                          timeout=60) as response:  # fmt: skip
            for i, _ in enumerate(response.iter_lines()):
                if i >= stop_after:
                    return  # closing the response drops the connection mid-answer

    threads = [threading.Thread(target=read_then_leave, args=(k % 5,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _assert_pages_back(stack, within=3.0)
    assert _chat(_client(stack), max_tokens=4).usage.completion_tokens == 4


def test_k48_decode_lost_mid_stream_fails_fast_and_recovers(stack):
    errors: list[str] = []
    started_streams = threading.Semaphore(0)

    def stream_long() -> None:
        try:
            for i, _ in enumerate(_chat(_client(stack), max_tokens=CONTEXT - 60, stream=True)):
                if i == 1:
                    started_streams.release()  # tokens are flowing
        except openai.APIError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=stream_long) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        for _ in threads:
            assert started_streams.acquire(timeout=60)
        stack.kill("decode-0")
        for thread in threads:
            thread.join(30)
        assert len(errors) == 3 and all("fail" in e.lower() for e in errors), errors

        for _ in range(20):  # no decode worker: each request fails fast, as retryable
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                _chat(_client(stack), max_tokens=4)
            assert err.value.status_code == 503 and time.monotonic() - started < 5.0
            assert err.value.response.headers.get("retry-after")
        prefill = _status(stack, "prefill-0")
        assert prefill.num_free_pages == prefill.num_total_pages
    finally:
        if stack.child("decode-0").poll() is not None:
            stack.restart("decode-0")  # the prefill worker keeps running
    _until_served(stack)
    _assert_pages_back(stack)


def test_prefill_killed_then_restarted(stack):
    stack.kill("prefill-0")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        _chat(_client(stack), max_tokens=4)
    assert err.value.status_code == 503 and time.monotonic() - started < 5.0
    status = _status(stack, "decode-0")  # the decode reservation was released
    assert status.num_free_pages == status.num_total_pages
    stack.restart("prefill-0")
    _until_served(stack)
    _assert_pages_back(stack)
