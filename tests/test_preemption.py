"""Preemption by swapping on the decode engine, in one process: a page pool too small for the
running requests swaps the newest out to host memory and back, and every request still gets
exactly the tokens it gets from a pool large enough for all of them."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from decode_worker.colocated import ColocatedDriver
from decode_worker.engine import DecodeEngine, DecodeOutput, Request
from prefill_worker.engine import PrefillEngine
from proto import control_pb2 as ctl
from router.metrics import Preemptions
from shared.kv_cache import OutOfPagesError
from shared.model.loader import load_text_model
from shared.runner import ModelRunner
from shared.sampling import SamplingConfig

PAGE_SIZE = 4
BIG_POOL = 256
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_model(tiny_checkpoint)


@pytest.fixture
def make_driver(model):
    """Drivers over a big prefill pool and a decode pool of `num_pages`; after the test, every
    allocator has all its pages back and no host copy is left."""
    made: list[ColocatedDriver] = []

    def make(num_pages: int, **engine_args) -> ColocatedDriver:
        engine_args.setdefault("resume_margin_tokens", 8)
        decode = DecodeEngine(ModelRunner(model, num_pages, PAGE_SIZE), **engine_args)
        driver = ColocatedDriver(PrefillEngine(ModelRunner(model, BIG_POOL, PAGE_SIZE)), decode)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        for allocator in (driver.prefill.runner.allocator, driver.decode.runner.allocator):
            assert allocator.num_free == allocator.num_pages, "pages leaked"
        assert driver.decode.swap.num_swapped == 0 and driver.decode.swap.used_bytes == 0


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1792, (n,), generator=gen).tolist() for n in lengths]


def _requests(prompts, max_tokens: list[int], sampling: list[SamplingConfig]) -> list[Request]:
    return [Request(f"r{i}", p, s, n, frozenset(), [])
            for i, (p, n, s) in enumerate(zip(prompts, max_tokens, sampling))]  # fmt: skip


def _events(request: Request) -> list[DecodeOutput]:
    return [request.outputs.get_nowait() for _ in range(request.outputs.qsize())]


def _run(driver: ColocatedDriver, requests: list[Request]) -> list[list[DecodeOutput]]:
    for request in requests:
        driver.submit(request)
    driver.run_until_idle()
    return [_events(r) for r in requests]


PROMPT_LENGTHS = [13, 20, 7, 16]
MAX_TOKENS = [40, 36, 44, 30]
SAMPLINGS = {
    "greedy": [GREEDY] * 4,
    "seeded": [SamplingConfig(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(4)],
}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_swapped_requests_match_a_big_pool_token_for_token(make_driver, kind):
    """4 requests need 53 pages at the end; 20 pages hold the prompts with room for a few
    steps, so the newest are swapped out and back."""
    prompts = _prompts(PROMPT_LENGTHS, seed=2)
    sampling = SAMPLINGS[kind]
    expected = _run(make_driver(BIG_POOL), _requests(prompts, MAX_TOKENS, sampling))
    assert [len(e) for e in expected] == [n + 1 for n in MAX_TOKENS]  # tokens, then the end

    small = make_driver(20, swap_space_bytes=1 << 30)
    got = _run(small, _requests(prompts, MAX_TOKENS, sampling))
    assert small.decode.swap.num_preemptions >= 2
    for want, have in zip(expected, got):
        assert [e.sampled.token_id for e in have[:-1]] == [e.sampled.token_id for e in want[:-1]]
        assert [e.sampled.logprob for e in have[:-1]] == pytest.approx(
            [e.sampled.logprob for e in want[:-1]], abs=1e-4
        )
        assert (have[-1].finish_reason, have[-1].error) == ("length", "")


def _step_until_swapped(driver: ColocatedDriver, requests: list[Request]) -> None:
    for request in requests:
        driver.submit(request)
    for _ in range(200):
        driver.step()
        if driver.decode.swap.num_swapped:
            return
    raise AssertionError("nothing was swapped out")


def test_abort_of_a_swapped_request_frees_its_host_copy(make_driver):
    prompts = _prompts(PROMPT_LENGTHS, seed=2)
    driver = make_driver(20, swap_space_bytes=1 << 30)
    requests = _requests(prompts, MAX_TOKENS, [GREEDY] * 4)
    _step_until_swapped(driver, requests)
    swap = driver.decode.swap
    victim = next(r for r in requests if r.request_id == swap.swapped_ids()[-1])
    assert victim.page_table == [] and swap.used_bytes > 0
    # A new reservation may not take the pages the swapped request waits for: the router retries.
    assert driver.decode.num_free_pages() < swap.pages_wanted
    with pytest.raises(OutOfPagesError, match="swapped-out requests wait for pages"):
        driver.decode.reserve(Request("late", [1, 2, 3], GREEDY, 4, frozenset(), []))
    num_tokens = victim.num_tokens
    assert driver.decode.abort(victim.request_id)
    driver.step()
    assert victim.request_id not in swap.swapped_ids()
    assert victim.num_tokens == num_tokens  # it never ran again
    driver.run_until_idle()
    events = _events(victim)
    assert events[-1].finish_reason == "abort"
    assert len(victim.output_ids) == num_tokens - len(victim.prompt_ids)
    for request in requests:
        if request is not victim:
            assert len(request.output_ids) == request.max_tokens


def test_exhausted_swap_space_fails_only_that_request(make_driver):
    """No host memory: the newest request ends with an error where it would have been swapped,
    and the older one finishes with the tokens a big pool gives."""
    prompts = _prompts([12, 12], seed=5)
    expected = _run(make_driver(BIG_POOL), _requests(prompts, [30, 30], [GREEDY] * 2))
    driver = make_driver(14, swap_space_bytes=0)
    older, newer = _run(driver, _requests(prompts, [30, 30], [GREEDY] * 2))
    assert (newer[-1].finish_reason, newer[-1].sampled) == ("error", None)
    assert "out of KV memory" in newer[-1].error and "swap space" in newer[-1].error
    assert 1 < len(newer) - 1 < 30  # it had streamed tokens
    assert [e.sampled.token_id for e in older[:-1]] == [
        e.sampled.token_id for e in expected[0][:-1]
    ]
    assert older[-1].finish_reason == "length"
    assert driver.decode.swap.num_preemptions == 0
    assert [e.sampled.token_id for e in newer[:-1]] == [
        e.sampled.token_id for e in expected[1][: len(newer) - 1]
    ]


def test_a_request_larger_than_the_pool_ends_with_an_error(make_driver):
    """12 pages hold 48 tokens: a request growing past them fails alone; the other finishes."""
    prompts = _prompts([10, 6], seed=7)
    driver = make_driver(12, swap_space_bytes=1 << 30)
    long, short = _run(driver, _requests(prompts, [60, 20], [GREEDY] * 2))
    assert long[-1].finish_reason == "error"
    assert long[-1].error == (
        "decode worker is out of KV memory: 49 tokens need 13 pages and the worker holds 12"
    )
    assert len(long) - 1 == 49 - 10  # tokens emitted until the 49th token needed a 13th page
    assert short[-1].finish_reason == "length" and len(short) - 1 == 20


def test_router_counts_preemptions_across_heartbeats_and_restarts():
    registry = CollectorRegistry()
    preemptions = Preemptions(registry)
    for worker_id, count in [("d0", 2), ("d1", 1), ("d0", 2), ("d0", 5), ("d0", 1), ("d1", 1)]:
        preemptions.update(worker_id, ctl.WorkerLoad(num_preemptions=count))
    # d0: 2, then +3, then restarted at 1; d1: 1
    assert registry.get_sample_value("kimiserve:decode_preemptions_total") == 2 + 3 + 1 + 1
