"""`GET /metrics` on the gateway: the router's Prometheus metrics, fetched over gRPC."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Response

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_metrics_route(routes: APIRouter, router_address: str) -> None:
    """Adds `GET /metrics` to `routes` (the API-key-protected ones)."""

    @routes.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        async with grpc.aio.insecure_channel(router_address) as channel:
            try:
                reply = await ctl_grpc.ControlStub(channel).Metrics(ctl.MetricsRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return Response(f"router unavailable: {exc.code().name}\n", 503)
        return Response(reply.text, media_type=CONTENT_TYPE)
