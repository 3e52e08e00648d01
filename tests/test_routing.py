"""Routing policies with numbers: least_load spreads a burst evenly; prefix_aware keeps requests
that share a long prefix on one prefill worker."""

from __future__ import annotations

import threading

import grpc
import httpx
import openai
from stack_utils import router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from router.pools import PREFIX_BLOCK, Pool, prefix_hashes

MODEL = "moonshotai/Kimi-K2.5"


def _served(stack, role: str) -> dict[str, int]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        workers = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest()).workers
    return {w.worker_id: w.num_served for w in workers if w.role == role}


def _chat(client, content: str, stream: bool = False):
    """The usage of one short greedy chat completion, streamed or not."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                              temperature=0).usage  # fmt: skip
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    return chunks[-1].usage


def _run(stack, policy_prompts: list[str], concurrent: bool,
         usages: list | None = None) -> dict[str, int]:  # fmt: skip
    """Prefill requests each worker served for these prompts; sequential runs alternate
    plain and streamed requests and append each usage to `usages`."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
    before = _served(stack, "prefill")
    if concurrent:
        threads = [threading.Thread(target=_chat, args=(client, p)) for p in policy_prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    else:
        for i, prompt in enumerate(policy_prompts):
            usage = _chat(client, prompt, stream=i % 2 == 1)
            if usages is not None:
                usages.append(usage)
    after = _served(stack, "prefill")
    return {w: after[w] - before.get(w, 0) for w in after}


def _tokens(stack, content: str) -> list[int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    answer = httpx.post(f"{stack.base_url}/tokenize", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["tokens"]


def _expected_cached(prompts: list[list[int]], page_size: int) -> list[int]:
    """What one prefill worker's prefix cache reuses for each prompt run in turn: the longest
    page-aligned prefix shared with an earlier prompt's full pages, the last token never."""
    expected = []
    for i, ids in enumerate(prompts):
        best = 0
        for earlier in prompts[:i]:
            shared = next((k for k, (a, b) in enumerate(zip(ids, earlier)) if a != b),
                          min(len(ids), len(earlier)))  # fmt: skip
            best = max(best, min(shared // page_size, len(earlier) // page_size))
        expected.append(min(best, (len(ids) - 1) // page_size) * page_size)
    return expected


def test_least_load_spreads_a_burst(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, policy="least_load", num_prefill=3)
    try:
        counts = _run(stack, [f"burst request {i} " * 40 for i in range(12)], concurrent=True)
    finally:
        stack.stop()
    assert sum(counts.values()) == 12
    assert max(counts.values()) - min(counts.values()) <= 2, counts


def test_prefix_aware_keeps_a_shared_prefix_on_one_worker(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, policy="prefix_aware", num_prefill=3)
    shared = "You are a meticulous assistant. Here is a long shared document. " * 30
    prompts = [shared + f"Question {i}?" for i in range(6)]
    usages: list = []
    try:
        counts = _run(stack, prompts, concurrent=False, usages=usages)
        others = _run(stack, [f"unrelated {i} " * 50 for i in range(6)], concurrent=False)
        ids = [_tokens(stack, prompt) for prompt in prompts]
    finally:
        stack.stop()
    assert sorted(counts.values()) == [0, 0, 6], counts
    assert sum(others.values()) == 6
    # The prefix cache of that one worker reused the shared prefix, page-aligned (16 tokens).
    assert [u.prompt_tokens for u in usages] == [len(i) for i in ids]
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached == _expected_cached(ids, 16)
    assert cached[0] == 0 and min(cached[1:]) >= 16 * (len(ids[0]) // 16 - 1), (cached, ids)


def test_prefix_index_matches_longest_prefix():
    pool = Pool("prefill", object, "prefix_aware")
    ids = list(range(5 * PREFIX_BLOCK))
    pool.prefixes.record(prefix_hashes(ids[: 3 * PREFIX_BLOCK]), "a")
    assert pool.prefixes.match(prefix_hashes(ids), {"a", "b"}) == ("a", 3)
    pool.prefixes.record(prefix_hashes(ids), "b")  # the latest prefiller holds the blocks
    assert pool.prefixes.match(prefix_hashes(ids), {"a", "b"}) == ("b", 5)
    assert pool.prefixes.match(prefix_hashes(ids), {"a"}) == (None, 0)
    assert pool.prefixes.match(prefix_hashes([9] * 40), {"a", "b"}) == (None, 0)
