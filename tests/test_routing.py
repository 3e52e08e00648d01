"""Routing policies with numbers: least_load spreads a burst evenly; prefix_aware keeps requests
that share a long prefix on one prefill worker."""

from __future__ import annotations

import threading

import grpc
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


def _chat(client, content: str) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                   max_tokens=2, temperature=0)  # fmt: skip


def _run(stack, policy_prompts: list[str], concurrent: bool) -> dict[str, int]:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
    before = _served(stack, "prefill")
    if concurrent:
        threads = [threading.Thread(target=_chat, args=(client, p)) for p in policy_prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    else:
        for prompt in policy_prompts:
            _chat(client, prompt)
    after = _served(stack, "prefill")
    return {w: after[w] - before.get(w, 0) for w in after}


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
    try:
        counts = _run(stack, [shared + f"Question {i}?" for i in range(6)], concurrent=False)
        others = _run(stack, [f"unrelated {i} " * 50 for i in range(6)], concurrent=False)
    finally:
        stack.stop()
    assert sorted(counts.values()) == [0, 0, 6], counts
    assert sum(others.values()) == 6


def test_prefix_index_matches_longest_prefix():
    pool = Pool("prefill", object, "prefix_aware")
    ids = list(range(5 * PREFIX_BLOCK))
    pool.prefixes.record(prefix_hashes(ids[: 3 * PREFIX_BLOCK]), "a")
    assert pool.prefixes.match(prefix_hashes(ids), {"a", "b"}) == ("a", 3)
    pool.prefixes.record(prefix_hashes(ids), "b")  # the latest prefiller holds the blocks
    assert pool.prefixes.match(prefix_hashes(ids), {"a", "b"}) == ("b", 5)
    assert pool.prefixes.match(prefix_hashes(ids), {"a"}) == (None, 0)
    assert pool.prefixes.match(prefix_hashes([9] * 40), {"a", "b"}) == (None, 0)
