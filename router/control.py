"""The router's operations service: registration, heartbeats, draining and the worker list.

`ControlServicer` is served beside `Router` on the router's port. `watch_liveness` runs as a
task and takes workers whose heartbeats stopped out of rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from router import metrics
from router.pools import Pool

logger = logging.getLogger(__name__)


class ControlServicer(ctl_grpc.ControlServicer):
    def __init__(self, pools: dict[str, Pool], heartbeat_interval_s: float = 1.0) -> None:
        self.pools = pools
        self.heartbeat_interval_s = heartbeat_interval_s

    def _find(self, worker_id: str):
        for pool in self.pools.values():
            worker = pool.get(worker_id)
            if worker is not None:
                return pool, worker
        return None, None

    async def Register(self, request: ctl.RegisterRequest, context) -> ctl.RegisterResponse:
        pool = self.pools.get(request.role)
        if pool is None:
            await context.abort(5, f"no pool for role {request.role!r}")  # NOT_FOUND
        pool.add(request.worker_id, request.address)
        logger.info("%s worker %s registered at %s (%d in the pool)", request.role,
                    request.worker_id, request.address, len(pool.workers))  # fmt: skip
        return ctl.RegisterResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request: ctl.HeartbeatRequest, context) -> ctl.HeartbeatResponse:
        pool, _ = self._find(request.worker_id)
        return ctl.HeartbeatResponse(known=bool(pool and pool.heartbeat(request.worker_id,
                                                                        request.load)))  # fmt: skip

    async def Drain(self, request: ctl.DrainRequest, context) -> ctl.DrainResponse:
        _, worker = self._find(request.worker_id)
        if worker is None:
            return ctl.DrainResponse(drained=True)
        worker.state = "draining"
        logger.info("draining %s (%d in flight)", worker.worker_id, worker.num_inflight)
        deadline = time.monotonic() + (request.timeout_s or 60.0)
        while worker.num_inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return ctl.DrainResponse(drained=worker.num_inflight == 0,
                                 num_inflight=worker.num_inflight)  # fmt: skip

    async def Remove(self, request: ctl.RemoveRequest, context) -> ctl.RemoveResponse:
        pool, worker = self._find(request.worker_id)
        if pool is None:
            return ctl.RemoveResponse(found=False)
        pool.remove(request.worker_id)
        await worker.channel.close()
        logger.info("removed %s worker %s", pool.role, request.worker_id)
        return ctl.RemoveResponse(found=True)

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
