"""A worker's side of the router's registry: register once, then send heartbeats with load.

`register_and_beat` registers synchronously (so a worker that prints READY is already in its
pool), then beats on a daemon thread; if the router forgot the worker it registers again, and
an unreachable router is retried quietly until it answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc

logger = logging.getLogger(__name__)


def load_of(status) -> ctl.WorkerLoad:
    """The load fields of a worker's `WorkerStatus`."""
    return ctl.WorkerLoad(
        num_free_pages=status.num_free_pages,
        num_total_pages=status.num_total_pages,
        num_running=status.num_running,
        num_waiting=status.num_waiting,
        num_cached_pages=status.num_cached_pages,
    )


def register_and_beat(
    router_address: str,
    role: str,
    worker_id: str,
    address: str,
    load: Callable[[], ctl.WorkerLoad],
    timeout_s: float = 60.0,
) -> threading.Thread:
    channel = grpc.insecure_channel(router_address)
    stub = ctl_grpc.ControlStub(channel)
    request = ctl.RegisterRequest(role=role, worker_id=worker_id, address=address)
    interval = stub.Register(request, timeout=timeout_s, wait_for_ready=True).heartbeat_interval_s
    logger.info("registered with the router at %s as %s %s", router_address, role, worker_id)

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                known = stub.Heartbeat(
                    ctl.HeartbeatRequest(worker_id=worker_id, load=load()), timeout=interval
                ).known
                if not known:
                    stub.Register(request, timeout=interval)
            except grpc.RpcError as exc:
                logger.debug("heartbeat to %s failed: %s", router_address, exc.code())

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread
