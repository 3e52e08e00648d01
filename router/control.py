"""The router's operations service: registration, heartbeats, draining and the worker list.

`ControlServicer` is served beside `Router` on the router's port. `watch_liveness` runs as a
task: it takes workers whose heartbeats stopped out of rotation, and brings back static workers
(no heartbeats) once they can be reached again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from router import metrics
from router.pools import Pool, Worker

logger = logging.getLogger(__name__)


class ControlServicer(ctl_grpc.ControlServicer):
    def __init__(self, pools: dict[str, Pool], heartbeat_interval_s: float = 1.0) -> None:
        self.pools = pools
        self.heartbeat_interval_s = heartbeat_interval_s

    def _find(self, worker_id: str) -> list[tuple[Pool, Worker]]:
        """(pool, entry) of every pool the worker is in: a colocated worker serves two roles
        under one id, so its heartbeat, drain and removal apply to both entries."""
        found = [(pool, pool.get(worker_id)) for pool in self.pools.values()]
        return [(pool, worker) for pool, worker in found if worker is not None]

    async def Register(self, request: ctl.RegisterRequest, context) -> ctl.RegisterResponse:
        pool = self.pools.get(request.role)
        if pool is None:
            await context.abort(5, f"no pool for role {request.role!r}")  # NOT_FOUND
        pool.add(request.worker_id, request.address)
        logger.info("%s worker %s registered at %s (%d in the pool)", request.role,
                    request.worker_id, request.address, len(pool.workers))  # fmt: skip
        return ctl.RegisterResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request: ctl.HeartbeatRequest, context) -> ctl.HeartbeatResponse:
        for _, worker in self._find(request.worker_id)[:1]:
            metrics.EXPERT_TOKENS.update(request.worker_id, worker.address, request.load)
            metrics.PREEMPTIONS.update(request.worker_id, request.load)
            metrics.VISION_CACHE_HITS.update(request.worker_id, request.load)
        known = [pool.heartbeat(request.worker_id, request.load)
                 for pool, _ in self._find(request.worker_id)]  # fmt: skip
        return ctl.HeartbeatResponse(known=any(known))

    async def Drain(self, request: ctl.DrainRequest, context) -> ctl.DrainResponse:
        workers = [worker for _, worker in self._find(request.worker_id)]
        for worker in workers:
            worker.state = "draining"

        def inflight() -> int:
            # A vision worker also holds the images of requests it encoded until they end.
            return sum(worker.num_inflight + worker.num_pinned for worker in workers)

        logger.info("draining %s (%d in flight)", request.worker_id, inflight())
        deadline = time.monotonic() + (request.timeout_s or 60.0)
        while inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return ctl.DrainResponse(drained=inflight() == 0, num_inflight=inflight())

    async def Remove(self, request: ctl.RemoveRequest, context) -> ctl.RemoveResponse:
        found = self._find(request.worker_id)
        for pool, worker in found:
            pool.remove(request.worker_id)
            await worker.channel.close()
            logger.info("removed %s worker %s", pool.role, request.worker_id)
        return ctl.RemoveResponse(found=bool(found))

    async def Metrics(self, request, context) -> ctl.MetricsResponse:
        metrics.update_pool_gauges(self.pools)
        return ctl.MetricsResponse(text=metrics.render())

    async def ListWorkers(self, request, context) -> ctl.ListWorkersResponse:
        return ctl.ListWorkersResponse(
            workers=[w.info() for pool in self.pools.values() for w in pool.workers]
        )


async def watch_liveness(pools: dict[str, Pool], lost_after_s: float) -> None:
    while True:
        await asyncio.sleep(lost_after_s / 4)
        metrics.update_pool_gauges(pools)
        for pool in pools.values():
            for worker in pool.expire(lost_after_s):
                logger.warning("%s worker %s missed its heartbeats; out of rotation", pool.role,
                               worker.worker_id)  # fmt: skip
            for worker in pool.revive_static():
                logger.info("%s worker %s is reachable again; back in rotation", pool.role,
                            worker.worker_id)  # fmt: skip
