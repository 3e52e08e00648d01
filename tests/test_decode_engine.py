"""The decode engine's request states and page accounting, in one process (no transfer)."""

from __future__ import annotations

import queue

import pytest
import torch

from decode_worker.engine import DecodeEngine, DecodeOutput, Request
from shared.kv_transfer import TransferState
from shared.messages import KVPushMsg
from shared.model.generate import greedy_generate
from shared.model.loader import load_text_model
from shared.runner import ModelRunner, SeqStep
from shared.sampling import SamplingConfig, sample_one

NUM_PAGES = 64


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_model(tiny_checkpoint)


@pytest.fixture
def engine(model):
    engine = DecodeEngine(ModelRunner(model, NUM_PAGES, page_size=4), transfer_timeout=0.3)
    engine.start()
    yield engine
    engine.stop()
    assert engine.num_free_pages() == NUM_PAGES  # nothing leaks, whatever the test did


def _request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, prompt, SamplingConfig(temperature=0.0), max_tokens,
                   frozenset(), [])  # fmt: skip


def _last(request: Request, timeout: float = 10.0) -> DecodeOutput:
    while True:
        out = request.outputs.get(timeout=timeout)
        if out.finish_reason:
            return out


def test_abort_while_waiting_for_kv_frees_pages_once(engine):
    request = _request("a", list(range(10)))
    pages = engine.reserve(request)
    assert len(pages) == 3 and engine.num_free_pages() == NUM_PAGES - 3
    assert engine.abort("a") is True
    assert engine.abort("a") is False  # already gone
    assert _last(request).finish_reason == "abort"
    assert engine.num_free_pages() == NUM_PAGES


def test_reservation_without_kv_expires(engine):
    request = _request("b", list(range(5)))
    engine.reserve(request)
    out = _last(request, timeout=5.0)
    assert out.finish_reason == "error" and "deadline" in out.error
    assert engine.num_free_pages() == NUM_PAGES


def test_abort_during_transfer_waits_for_the_receiver(engine):
    request = _request("c", list(range(6)))
    engine.reserve(request)
    assert engine.pages_of("c") == request.page_table  # the receiver starts writing
    assert request.state == TransferState.TRANSFERRING
    engine.abort("c")
    with pytest.raises(queue.Empty):
        request.outputs.get(timeout=0.5)  # pages still in use by the transfer
    assert engine.num_free_pages() == NUM_PAGES - 2
    engine.on_transfer_done("c", KVPushMsg("p", "c", 6, 1, 0, 0.0), "")
    assert _last(request).finish_reason == "abort"


def test_decode_after_transfer_matches_single_process(engine, model):
    prompt = [5, 17, 300, 42, 9, 1200, 77]
    prefill = ModelRunner(model, 8, page_size=4)
    pages = prefill.allocator.allocate(2)
    logits = prefill.run([SeqStep(prompt, 0, pages)])
    first = sample_one(logits[0], SamplingConfig(temperature=0.0), 0)
    ckv, kpe = prefill.cache.gather(pages, len(prompt))

    request = _request("d", prompt, max_tokens=12)
    engine.reserve(request)
    engine.runner.cache.scatter(engine.pages_of("d"), ckv, kpe)
    engine.on_transfer_done("d", KVPushMsg("p", "d", len(prompt), 1, first.token_id, 0.0), "")
    tokens = []
    while True:
        out = request.outputs.get(timeout=10)
        if out.sampled:
            tokens.append(out.sampled.token_id)
        if out.finish_reason:
            break
    assert out.finish_reason == "length"
    assert tokens == greedy_generate(model, prompt, 12)
    assert torch.equal(torch.tensor(tokens[:1]), torch.tensor([first.token_id]))
