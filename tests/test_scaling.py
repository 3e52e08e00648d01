"""Live scaling under load: 1 prefill + 1 decode -> 3 + 2 -> 1 + 1 while requests keep coming."""

from __future__ import annotations

import threading
import time

import grpc
import openai
from stack_utils import router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc

MODEL = "moonshotai/Kimi-K2.5"


def _workers(stack) -> dict[str, ctl.WorkerInfo]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        reply = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest(), timeout=5)
    return {w.worker_id: w for w in reply.workers}


def test_scale_up_and_down_while_serving(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, policy="least_load")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                    temperature=0,
                )  # fmt: skip
                results.append(reply.choices[0].finish_reason)
            except openai.APIError as exc:
                results.append(f"error: {exc}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        assert stack.scale({"prefill": 3, "decode": 2}) == {"vision": 1, "prefill": 3, "decode": 2}
        time.sleep(6)
        up = _workers(stack)
        assert {w.worker_id for w in up.values() if w.state == "ready"} == {
            "prefill-0", "prefill-1", "prefill-2", "decode-0", "decode-1",
            "vision-0"}  # fmt: skip
        for new in ("prefill-1", "prefill-2", "decode-1"):
            assert up[new].num_served > 0, f"{new} took no traffic"
        assert stack.scale({"prefill": 1, "decode": 1}) == {"vision": 1, "prefill": 1, "decode": 1}
        time.sleep(2)
        assert set(_workers(stack)) == {"prefill-0", "decode-0", "vision-0"}
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        stack.stop()
    errors = [r for r in results if r.startswith("error")]
    assert errors == [] and len(results) > 20, (len(results), errors[:3])
