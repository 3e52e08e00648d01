"""The colocated stack (`kimiserve up --colocated`): one worker process does prefill and decode
around one model and one KV cache, behind the same gateway and router. Its greedy tokens equal a
one-process generation, every page comes back after finished and abandoned requests, and with a
second colocated worker each request still stays in the worker that reserved its pages."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
from stack_utils import router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc

MODEL = "moonshotai/Kimi-K2.5"
PROMPTS = [
    "Explain mixture-of-experts in one sentence.",
    "Hi",
    "Summarise: the quick brown fox jumps over the lazy dog. " * 8,
    "What is 17 * 23?",
]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, colocated=True)
    yield stack
    stack.stop()


def _status(stack) -> pb.WorkerStatus:
    with grpc.insecure_channel(stack.child("decode-0").address) as channel:
        return pb_grpc.DecodeWorkerStub(channel).Status(pb.StatusRequest(), timeout=5)


def _workers(stack) -> list[ctl.WorkerInfo]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        reply = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest(), timeout=5)
    return [w for w in reply.workers if w.role != "vision"]


def test_one_process_serves_both_pools(stack):
    workers = [c.name for c in stack.children if c.name.startswith(("decode", "prefill"))]
    assert workers == ["decode-0"]
    roles = {(w.role, w.worker_id, w.address, w.state) for w in _workers(stack)}
    address = stack.child("decode-0").address
    assert roles == {
        ("decode", "decode-0", address, "ready"),
        ("prefill", "decode-0", address, "ready"),
    }


def test_colocated_matches_single_process(stack, tiny_checkpoint):
    """Greedy tokens of concurrent requests (prefills land between decode steps of the others)
    equal `greedy_generate`, token for token."""
    from shared.model.generate import greedy_generate
    from shared.model.loader import load_text_model
    from shared.tokenizer import KimiTokenizer

    tokenizer = KimiTokenizer.from_dir(tiny_checkpoint)
    model = load_text_model(tiny_checkpoint)
    served: dict[int, list[int]] = {}

    def run(index: int, prompt_ids: list[int]) -> None:
        with grpc.insecure_channel(router_address(stack)) as channel:
            request = pb.GenerateRequest(
                request_id=f"colocated-{index}",
                prompt_token_ids=prompt_ids,
                sampling=pb.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
            )
            chunks = pb_grpc.RouterStub(channel).Generate(request, timeout=120)
            served[index] = [t for chunk in chunks for c in chunk.choices for t in c.token_ids]

    prompts = [tokenizer.encode(p) for p in PROMPTS]
    threads = [threading.Thread(target=run, args=item) for item in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    for index, prompt_ids in enumerate(prompts):
        assert served[index] == greedy_generate(model, prompt_ids, 32), PROMPTS[index]


def test_pages_come_back_after_requests(stack):
    start = _status(stack)
    assert start.role == "decode"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi " * 40}],
            "max_tokens": 200, "temperature": 0, "stream": True}  # fmt: skip
    with httpx.Client(base_url=f"{stack.base_url}/v1", timeout=60) as client:
        for _ in range(3):  # clients that leave after the first event
            with client.stream("POST", "/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())
        finished = client.post("/chat/completions", json={**body, "stream": False, "max_tokens": 8})
        assert finished.status_code == 200
    deadline = time.monotonic() + 10
    while _status(stack).num_free_pages != start.num_free_pages:
        assert time.monotonic() < deadline, (_status(stack).num_free_pages, start.num_free_pages)
        time.sleep(0.1)
    assert start.num_free_pages == start.num_total_pages


def test_a_second_worker_prefills_its_own_requests(stack):
    """The router sends the prefill to the worker that reserved the pages: no KV moves."""
    stack.scale({"decode": 2})
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            for _ in range(4):
                assert client.post("/v1/chat/completions", json=body).status_code == 200
            metrics = client.get("/metrics").text
        pushed = [line for line in metrics.splitlines()
                  if line.startswith("kimiserve:kv_transfer_bytes_total")]  # fmt: skip
        assert all(float(line.split()[-1]) == 0 for line in pushed), pushed
        served = {(w.role, w.worker_id): w.num_served for w in _workers(stack)}
        assert all(served[(role, f"decode-{i}")] > 0 for role in ("prefill", "decode")
                   for i in range(2)), served  # fmt: skip
    finally:
        stack.scale({"decode": 1})
    assert {(w.role, w.worker_id) for w in _workers(stack)} == {
        ("decode", "decode-0"),
        ("prefill", "decode-0"),
    }
