"""Faults while serving (DESIGN.md section 9): over-long prompts, clients that leave, and the
vision, prefill and decode workers killed with SIGKILL while others stream. After each, free
pages on every worker return to their start value, nothing of the killed process is left, and
the pool recovers when the worker is restarted."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from image_utils import data_url, natural_photo_jpeg
from stack_utils import router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc

MODEL = "moonshotai/Kimi-K2.5"
CONTEXT = 256
SHORT_TOKENS = 16


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, context_length=CONTEXT, kv_transfer_timeout=5.0,
                        num_vision=2)  # fmt: skip
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


def _streamed_text(stack, content: str) -> tuple[str, str]:
    """(reasoning and content text, finish reason) of a short greedy streaming chat."""
    text, finish = "", ""
    for chunk in _chat(_client(stack), content, max_tokens=SHORT_TOKENS, stream=True):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            text += (extra.get("reasoning_content") or "") + (choice.delta.content or "")
            finish = choice.finish_reason or finish
    return text, finish


@contextlib.contextmanager
def _short_streams(stack, keep_going: Callable[[], bool]):
    """Two threads streaming short chats one after another while `keep_going()`; yields the
    list of (prompt, text, finish reason) or exceptions, complete after the block."""
    results: list = []

    def run(k: int) -> None:
        while keep_going():
            try:
                results.append((f"short {k}", *_streamed_text(stack, f"short {k}")))
            except openai.APIError as exc:
                results.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        yield results
    finally:
        for thread in threads:
            thread.join(60)


def _check_short_streams(stack, results: list, at_least: int = 4) -> None:
    """Every short stream finished at its limit with the text it gets when alone."""
    assert len(results) >= at_least, results
    alone = {prompt: _streamed_text(stack, prompt) for prompt in ("short 0", "short 1")}
    for result in results:
        assert not isinstance(result, Exception), result
        prompt, text, finish = result
        assert finish == "length" and (text, finish) == alone[prompt]


def _router_workers(stack) -> dict[str, ctl.WorkerInfo]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        reply = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest(), timeout=5)
    return {worker.worker_id: worker for worker in reply.workers}


def _wait_router_state(stack, worker_id: str, state: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (found := _router_workers(stack)[worker_id]).state != state:
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def _assert_no_orphans(pids: list[int]) -> None:
    """The killed processes are gone (reaped, not zombies), and so is everything they started:
    each child runs in its own session, so its process group is its pid."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if int(fields[2]) in pids:
                left.append(stat.parent.name)
    assert not left, f"processes {left} outlived their killed group"


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
        pid = stack.child("decode-0").process.pid
        stack.kill("decode-0")
        _assert_no_orphans([pid])
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
    _wait_router_state(stack, "decode-0", "ready")
    _assert_pages_back(stack)


def test_prefill_killed_then_restarted(stack):
    pid = stack.child("prefill-0").process.pid
    stack.kill("prefill-0")
    _assert_no_orphans([pid])
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        _chat(_client(stack), max_tokens=4)
    assert err.value.status_code == 503 and time.monotonic() - started < 5.0
    status = _status(stack, "decode-0")  # the decode reservation was released
    assert status.num_free_pages == status.num_total_pages
    stack.restart("prefill-0")
    _until_served(stack)
    _wait_router_state(stack, "prefill-0", "ready")
    _assert_pages_back(stack)


def _image_chat(stack, seed: int, outcomes: list, max_tokens: int = 4, stream: bool = False,
                on_first_token=None):  # fmt: skip
    """A chat about a photo of its own (so the vision worker encodes it); appends the reply (the
    finish reason when streaming) or the error to `outcomes`. A stream calls `on_first_token`
    when its first token arrives (its image was encoded and prefilled by then)."""
    image = {
        "type": "image_url",
        "image_url": {"url": data_url(natural_photo_jpeg(96, 64, seed), "image/jpeg")},
    }
    content = [{"type": "text", "text": "What is it?"}, image]  # fmt: skip
    try:
        reply = _chat(_client(stack), content, max_tokens=max_tokens, stream=stream)
        if not stream:
            outcomes.append(reply)
            return
        finish, waiting_for_text = "", on_first_token is not None
        for chunk in reply:
            delta = chunk.choices[0].delta
            text = delta.content or (delta.model_extra or {}).get("reasoning_content")
            if waiting_for_text and text:
                on_first_token()
                waiting_for_text = False
            finish = chunk.choices[0].finish_reason or finish
        outcomes.append(finish)
    except openai.APIError as exc:
        outcomes.append(exc)


def _vision_status(stack, name: str) -> vpb.VisionStatus:
    with grpc.insecure_channel(f"127.0.0.1:{stack.child(name).port}") as channel:
        return vpb_grpc.VisionWorkerStub(channel).Status(vpb.VisionStatusRequest(), timeout=5)


def _until_unpinned(stack, names: list[str]) -> None:
    """Until the vision workers hold no pin: the router releases them as its requests end."""
    deadline = time.monotonic() + 5.0
    while any(_vision_status(stack, name).num_pinned_images for name in names):
        assert time.monotonic() < deadline, "a finished request kept its images pinned"
        time.sleep(0.05)


def _in_background(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def _stop_and_kill(stack, name: str, num_requests: int, first_seed: int) -> tuple[int, list]:
    """Freezes the vision worker, sends image requests until the router has `num_requests`
    waiting on it (round robin sends the others to the other worker, if ready), then SIGKILLs
    it. Returns its pid and the outcomes once every request ended."""
    child, worker_id = stack.child(name), name
    outcomes: list = []
    child.signal(signal.SIGSTOP)
    threads = []
    deadline = time.monotonic() + 30
    while _router_workers(stack)[worker_id].num_inflight < num_requests:
        assert time.monotonic() < deadline, "no image request reached the frozen vision worker"
        threads.append(_in_background(_image_chat, stack, first_seed + len(threads), outcomes))
        time.sleep(0.3)
    pid = child.process.pid
    stack.kill(name)
    killed = time.monotonic()
    for thread in threads:
        thread.join(30)
    ended = time.monotonic() - killed
    print(f"{name} killed with {len(threads)} image requests sent: all ended {ended:.2f} s later")
    assert ended < 5.0 and len(outcomes) == len(threads)
    return pid, outcomes


def test_vision_killed_retries_elsewhere_then_503_and_recovers(stack):
    """SIGKILL each vision worker while text streams and image requests are in flight: image
    requests waiting on the first are encoded on the second; once none is left, they get 503 at
    once; text never notices; both workers serve again when restarted."""
    warm: list = []
    _image_chat(stack, 0, warm)
    assert not isinstance(warm[0], Exception), warm
    done = threading.Event()
    image_streams: list = []
    with _short_streams(stack, lambda: not done.is_set()) as text_results:
        flowing = threading.Semaphore(0)
        streaming = [_in_background(_image_chat, stack, 100 + k, image_streams, 60, True,
                                    flowing.release) for k in range(2)]  # fmt: skip
        for _ in streaming:  # both images encoded and prefilled before any vision worker dies
            assert flowing.acquire(timeout=60), "an image stream never started"
        pid0, outcomes = _stop_and_kill(stack, "vision-0", 2, first_seed=1)
        assert all(not isinstance(o, Exception) and o.usage.completion_tokens == 4
                   for o in outcomes), outcomes  # fmt: skip
        assert _router_workers(stack)["vision-0"].state == "lost"

        pid1, outcomes = _stop_and_kill(stack, "vision-1", 2, first_seed=50)
        _image_chat(stack, 99, outcomes)  # and one sent after: none is left
        for outcome in outcomes:
            assert isinstance(outcome, openai.APIStatusError) and outcome.status_code == 503
            assert "no vision worker is available" in outcome.message
            assert outcome.response.headers.get("retry-after") == "1"
        for thread in streaming:
            thread.join(30)
        done.set()
    assert image_streams == ["length", "length"]
    _check_short_streams(stack, text_results)
    _assert_no_orphans([pid0, pid1])
    _assert_pages_back(stack)
    not_ready = httpx.get(f"{stack.base_url}/health/ready", timeout=30)
    assert not_ready.status_code == 503 and not_ready.json()["ready_workers"]["vision"] == 0

    for name in ("vision-0", "vision-1"):
        started = time.monotonic()
        stack.restart(name)
        _wait_router_state(stack, name, "ready")
        print(f"{name} restarted and back in rotation in {time.monotonic() - started:.1f} s")
    ready = httpx.get(f"{stack.base_url}/health/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready_workers"]["vision"] == 2
    outcomes = []
    for seed in (0, 200, 201):  # a cached image would not reach the restarted workers
        _image_chat(stack, seed, outcomes)
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert outcomes[0].choices[0].message == warm[0].choices[0].message  # same image, same answer
    _until_unpinned(stack, ["vision-0", "vision-1"])
    assert all(_vision_status(stack, name).num_misses for name in ("vision-0", "vision-1"))


def test_vision_lost_between_encode_and_prefill_is_encoded_again(stack):
    """The vision worker dies after encoding, before the prefill worker fetched the embeddings
    (held back by freezing the prefill worker): the router encodes the image again on the other
    vision worker, and the request succeeds as if nothing happened."""
    expected: list = []
    _image_chat(stack, 300, expected)
    names = ["vision-0", "vision-1"]
    _until_unpinned(stack, names)  # so the pin found below is the new request's
    outcomes: list = []
    prefill = stack.child("prefill-0")
    prefill.signal(signal.SIGSTOP)  # briefly: its heartbeats must not lapse (3 s)
    try:
        thread = _in_background(_image_chat, stack, 300, outcomes)
        deadline = time.monotonic() + 2.0
        while not (pinned := [n for n in names if _vision_status(stack, n).num_pinned_images]):
            assert time.monotonic() < deadline, "the image was never encoded"
            time.sleep(0.05)
        pid = stack.child(pinned[0]).process.pid
        stack.kill(pinned[0])
    finally:
        prefill.signal(signal.SIGCONT)
    thread.join(30)
    # Its embeddings died with the worker before the prefill worker could fetch them, so the
    # answer came from a second encoding.
    assert not isinstance(outcomes[0], Exception), outcomes
    assert outcomes[0].choices[0].message == expected[0].choices[0].message
    _assert_no_orphans([pid])
    _assert_pages_back(stack)
    stack.restart(pinned[0])
    _wait_router_state(stack, pinned[0], "ready")
