"""Expert-parallel decode workers in the whole stack: same greedy tokens as one rank, and a
lost rank takes its whole worker out while the other workers keep serving."""

from __future__ import annotations

import json
import random
import time

import grpc
import openai
import pytest
from stack_utils import router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.model.generate import greedy_generate
from shared.model.loader import load_text_model

NUM_PROMPTS = 16
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    model = load_text_model(tiny_checkpoint)
    prompts = _prompts()
    return prompts, [greedy_generate(model, p, NUM_TOKENS) for p in prompts]


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(1792) for _ in range(rng.randint(3, 60))] for _ in range(NUM_PROMPTS)]


def _served(stack, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with grpc.insecure_channel(router_address(stack)) as channel:
        stub = pb_grpc.RouterStub(channel)
        for i, ids in enumerate(prompts):
            request = pb.GenerateRequest(
                request_id=f"ep-{i}", prompt_token_ids=ids,
                sampling=pb.SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True),
            )  # fmt: skip
            out.append([t for chunk in stub.Generate(request) for c in chunk.choices
                        for t in c.token_ids])  # fmt: skip
    return out


def _states(stack, *worker_ids: str) -> set[str]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        workers = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest()).workers
    return {w.state for w in workers if w.worker_id in worker_ids}


def test_ep4_matches_one_rank(tiny_checkpoint, expected):
    prompts, tokens = expected
    stack = start_stack(tiny_checkpoint, decode_ep_size=4)
    try:
        assert _served(stack, prompts) == tokens
    finally:
        stack.stop()


def test_ep2_shuffled_placement_matches_then_survives_a_lost_rank(
    tiny_checkpoint, expected, tmp_path
):
    owner = [0, 1] * 8
    random.Random(3).shuffle(owner)
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(owner))
    prompts, tokens = expected
    stack = start_stack(tiny_checkpoint, decode_ep_size=2, num_decode=2,
                        expert_placement=str(placement), kv_transfer_timeout=10.0)  # fmt: skip
    try:
        assert _served(stack, prompts) == tokens
        stack.kill("decode-0.r1")
        deadline = time.monotonic() + 30
        while stack.child("decode-0").poll() is None:  # the peer exits, it does not hang
            assert time.monotonic() < deadline, "rank 0 hung after losing rank 1"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while _states(stack, "decode-0", "decode-0.r1") != {"lost"}:  # out of the pool
            assert time.monotonic() < deadline, _states(stack, "decode-0", "decode-0.r1")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
        for _ in range(6):  # decode-1's ranks keep serving
            reply = client.chat.completions.create(
                model="moonshotai/Kimi-K2.5", messages=[{"role": "user", "content": "Hi"}],
                max_tokens=3, temperature=0,
            )  # fmt: skip
            assert reply.usage.completion_tokens == 3
    finally:
        stack.stop()
