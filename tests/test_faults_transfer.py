"""Workers killed in the middle of a KV transfer (K50): the other side frees the request's pages
within the transfer deadline, the client gets an error and never text from partial KV, and the
next request succeeds on a new pair."""

from __future__ import annotations

import threading
import time

import openai
import pytest
from stack_utils import start_stack
from test_faults import (
    _assert_no_orphans,
    _assert_pages_back,
    _chat,
    _client,
    _status,
    _until_served,
    _wait_router_state,
)

DEADLINE = 5.0
DELAY = 3.0  # the prefill side pauses this long between the KV control message and the data


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, kv_transfer_timeout=DEADLINE, fault_kv_delay=DELAY)
    yield stack
    stack.stop()


def _request_in_background(stack) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_chat(_client(stack), max_tokens=8))
        except openai.APIError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_transferring(stack) -> None:
    """Until the decode side holds the request's pages (it waits inside the transfer)."""
    deadline = time.monotonic() + DELAY
    while True:
        status = _status(stack, "decode-0")
        if status.num_free_pages < status.num_total_pages:
            time.sleep(0.3)  # the control message is out; the data is not
            return
        assert time.monotonic() < deadline, "the request never reached the transfer"
        time.sleep(0.05)


def test_k50_prefill_killed_mid_transfer(stack):
    _until_served(stack)  # builds the pair once (slow first request)
    thread, outcome = _request_in_background(stack)
    _wait_transferring(stack)
    pid = stack.child("prefill-0").process.pid
    stack.kill("prefill-0")
    _assert_no_orphans([pid])
    thread.join(60)
    assert isinstance(outcome[0], openai.APIStatusError), outcome
    assert outcome[0].status_code >= 500
    started = time.monotonic()
    decode = _status(stack, "decode-0")
    while decode.num_free_pages != decode.num_total_pages:
        assert time.monotonic() - started < DEADLINE + 2, decode
        time.sleep(0.1)
        decode = _status(stack, "decode-0")
    stack.restart("prefill-0")
    _until_served(stack)
    _wait_router_state(stack, "prefill-0", "ready")
    _assert_pages_back(stack)


def test_decode_killed_mid_transfer(stack):
    _until_served(stack)
    thread, outcome = _request_in_background(stack)
    _wait_transferring(stack)
    pid = stack.child("decode-0").process.pid
    stack.kill("decode-0")
    _assert_no_orphans([pid])
    thread.join(60)
    assert isinstance(outcome[0], openai.APIStatusError), outcome
    prefill = _status(stack, "prefill-0")
    assert prefill.num_free_pages == prefill.num_total_pages
    stack.restart("decode-0")
    _until_served(stack)
    _wait_router_state(stack, "decode-0", "ready")
    _assert_pages_back(stack)
