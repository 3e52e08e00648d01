"""Long streams on a decode worker whose page pool cannot hold them all: requests are swapped out
to host memory and back, and every stream still ends with all its tokens."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest
from stack_utils import start_stack

MODEL = "moonshotai/Kimi-K2.5"
NUM_STREAMS = 4


def _stream(client: openai.OpenAI, max_tokens: int, results: dict, index: int) -> None:
    chunks, finish, usage = [], None, None
    stream = client.completions.create(
        model=MODEL, prompt="The same prompt for every stream", max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        for choice in chunk.choices:
            chunks.append(choice.text)
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    results[index] = ("".join(chunks), finish, usage.completion_tokens if usage else None)


def _metric(stack, name: str) -> float:
    text = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _check_streams(stack, max_tokens: int, total_decode_pages: int) -> None:
    """NUM_STREAMS greedy streams of one prompt all end with `max_tokens` tokens and the same
    text; preemptions were reported, and the decode pages and swap space are empty again."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0,
                           timeout=600)  # fmt: skip
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=_stream, args=(client, max_tokens, results, i))
               for i in range(NUM_STREAMS)]  # fmt: skip
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    print(f"{NUM_STREAMS} streams of {max_tokens} tokens in {time.monotonic() - started:.1f} s")
    assert sorted(results) == list(range(NUM_STREAMS))
    ends = [(finish, n) for _, finish, n in results.values()]
    assert ends == [("length", max_tokens)] * NUM_STREAMS
    assert len({text for text, _, _ in results.values()}) == 1  # swapped streams equal the others

    deadline = time.monotonic() + 10  # the counts travel with the next heartbeats
    while _metric(stack, "kimiserve:decode_preemptions_total") == 0:
        assert time.monotonic() < deadline, "no preemption was reported"
        time.sleep(0.5)
    print(f"preemptions: {_metric(stack, 'kimiserve:decode_preemptions_total'):.0f}")
    while (_metric(stack, 'kimiserve:pool_free_pages{role="decode"}') != total_decode_pages
           or _metric(stack, 'kimiserve:pool_swapped{role="decode"}') != 0):  # fmt: skip
        assert time.monotonic() < deadline, "decode pages or swap space not back"
        time.sleep(0.5)


def test_long_streams_on_a_small_pool_all_finish(tiny_checkpoint):
    """The reliability notes' case: 4 x 3,000 tokens need 752 pages of 16 and the pool has 512;
    one of these streams used to fail after 2,005 tokens."""
    stack = start_stack(tiny_checkpoint, num_pages=512)
    try:
        _check_streams(stack, 3000, 512)
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("layout", "max_tokens"), [({"decode_ep_size": 2}, 600), ({"colocated": True}, 400)], ids=str
)
def test_preemption_on_expert_parallel_and_colocated_workers(tiny_checkpoint, layout, max_tokens):
    """Expert parallelism: each rank (64 pages) swaps its own requests while the ranks keep
    stepping in lockstep. Colocated: prefill and decode share the one pool of 64 pages."""
    stack = start_stack(tiny_checkpoint, num_pages=64, **layout)
    try:
        _check_streams(stack, max_tokens, 64 * layout.get("decode_ep_size", 1))
    finally:
        stack.stop()
