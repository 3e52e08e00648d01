"""The load-based planner: pure decisions, then a live burst that grows and shrinks the pool."""

from __future__ import annotations

import threading
import time

import openai
from stack_utils import start_stack

from deploy.planner import PlannerConfig, decide
from proto import control_pb2 as ctl


def _worker(role: str, inflight: int = 0, free: int = 100, total: int = 100) -> ctl.WorkerInfo:
    load = ctl.WorkerLoad(num_free_pages=free, num_total_pages=total)
    return ctl.WorkerInfo(role=role, state="ready", num_inflight=inflight, load=load)


def test_decisions_respect_bounds_and_say_why():
    config = PlannerConfig(min_prefill=1, max_prefill=3, min_decode=1, max_decode=2)
    busy = [_worker("prefill", inflight=5), _worker("decode", inflight=5)]
    up = decide(config, busy)
    assert up.sizes == {"prefill": 2, "decode": 1} and "prefill queue 5.0" in up.reason
    at_max = [_worker("prefill", inflight=9)] * 3 + [_worker("decode", free=5)]
    grow_decode = decide(config, at_max)
    assert grow_decode.sizes == {"prefill": 3, "decode": 2} and "95% used" in grow_decode.reason
    idle = [_worker("prefill"), _worker("prefill"), _worker("decode"), _worker("decode")]
    assert decide(config, idle).sizes == {"prefill": 1, "decode": 2}  # one change at a time
    assert decide(config, [_worker("prefill"), _worker("decode")]) is None  # at the minimum


def test_burst_grows_the_prefill_pool_and_idleness_shrinks_it(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, autoscale_interval=0.5, max_prefill=3)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
    sizes, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            sizes.append(len(stack.workers("prefill")))
            time.sleep(0.2)

    def request(i: int) -> None:
        # Each prompt its own from the first token: a shared prefix would be served from the
        # prefill worker's prefix cache, and no queue would build.
        client.chat.completions.create(
            model="moonshotai/Kimi-K2.5", max_tokens=2,
            messages=[{"role": "user", "content": f"{i}: " + "count the words " * 300}],
        )  # fmt: skip

    watcher = threading.Thread(target=watch)
    try:
        stack.start_autoscaler()
        watcher.start()
        for wave in range(3):  # three waves of a burst
            burst = [threading.Thread(target=request, args=(12 * wave + i,)) for i in range(12)]
            for thread in burst:
                thread.start()
            for thread in burst:
                thread.join(120)
        assert max(sizes) >= 2, sizes
        deadline = time.monotonic() + 60
        while len(stack.workers("prefill")) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(stack.workers("prefill")) == 1
    finally:
        stop.set()
        watcher.join()
        stack.stop()
