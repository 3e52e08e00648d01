"""Fixtures of the gateway tests: the scripted router and gateways in front of it."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from gateway_harness import API_KEY, BODY_LIMIT, MODEL, GatewayThread, ScriptedRouter

from proto import kimiserve_pb2_grpc as pb_grpc
from router.gateway import create_app


@pytest.fixture(scope="module")
def router():
    servicer = ScriptedRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


@pytest.fixture(autouse=True)
def fresh_router(request):
    if "router" in request.fixturenames:
        request.getfixturevalue("router").reset()


@pytest.fixture(scope="module")
def gateway(router):
    with GatewayThread(create_app(router.address, MODEL)) as served:
        yield served.url


@pytest.fixture(scope="module")
def secured(router):
    app = create_app(router.address, MODEL, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    with GatewayThread(app) as served:
        yield served.url


@pytest.fixture(scope="module")
def orphan():
    """A gateway whose router address has nobody listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with GatewayThread(create_app(address, MODEL)) as served:
        yield served.url
