"""Load-based autoscaling (`kimiserve up --autoscale`): decides pool sizes from router load.

Signals, read from the router's worker list every `interval`: requests in flight on the
prefill pool (the prefill queue) and on the decode pool, and decode page usage. At most one
change per interval, always within the configured bounds, each logged with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import grpc

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    interval: float = 10.0
    min_prefill: int = 1
    max_prefill: int = 3
    min_decode: int = 1
    max_decode: int = 3
    prefill_queue_high: float = 2.0  # prefill requests in flight per worker that add a worker
    decode_inflight_high: float = 64.0  # decode requests per worker that add a worker
    decode_pages_high: float = 0.9  # decode page usage that adds a worker


@dataclasses.dataclass(frozen=True)
class Decision:
    sizes: dict[str, int]
    reason: str


def _pressure(workers: list[ctl.WorkerInfo], role: str) -> tuple[int, float, float]:
    mine = [w for w in workers if w.role == role and w.state == "ready"]
    if not mine:
        return 0, 0.0, 0.0
    inflight = sum(w.num_inflight + w.load.num_waiting for w in mine) / len(mine)
    total = sum(w.load.num_total_pages for w in mine)
    used = 1 - sum(w.load.num_free_pages for w in mine) / total if total else 0.0
    return len(mine), inflight, used


def decide(config: PlannerConfig, workers: list[ctl.WorkerInfo]) -> Decision | None:
    """The one change to make now, or None. Pure: the tests drive it with built worker lists."""
    num_prefill, prefill_queue, _ = _pressure(workers, "prefill")
    num_decode, decode_inflight, decode_used = _pressure(workers, "decode")
    sizes = {"prefill": num_prefill, "decode": num_decode}
    if prefill_queue > config.prefill_queue_high and num_prefill < config.max_prefill:
        reason = f"prefill queue {prefill_queue:.1f} per worker > {config.prefill_queue_high}"
        return Decision({**sizes, "prefill": num_prefill + 1}, reason)
    decode_busy = decode_inflight > config.decode_inflight_high
    if (decode_busy or decode_used > config.decode_pages_high) and num_decode < config.max_decode:
        reason = f"decode {decode_inflight:.1f} requests per worker, pages {decode_used:.0%} used"
        return Decision({**sizes, "decode": num_decode + 1}, reason)
    if prefill_queue == 0 and num_prefill > config.min_prefill:
        return Decision({**sizes, "prefill": num_prefill - 1}, "prefill pool idle")
    if decode_inflight == 0 and num_decode > config.min_decode:
        return Decision({**sizes, "decode": num_decode - 1}, "decode pool idle")
    return None


def run_planner(stack, config: PlannerConfig, stop: threading.Event) -> None:
    """Loop of the planner thread: observe, decide, scale, until `stop` is set."""
    while not stop.wait(config.interval):
        try:
            with grpc.insecure_channel(stack.router_address) as channel:
                workers = list(ctl_grpc.ControlStub(channel).ListWorkers(
                    ctl.ListWorkersRequest(), timeout=5).workers)  # fmt: skip
        except grpc.RpcError as exc:
            logger.warning("planner could not read the router: %s", exc.code())
            continue
        decision = decide(config, workers)
        if decision is not None:
            logger.info("autoscale: %s -> %s", decision.reason, decision.sizes)
            stack.scale(decision.sizes)
