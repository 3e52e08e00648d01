"""Load and slow clients on a live stack.

- 64 concurrent streaming clients (async `openai`) for 60 seconds: no errors, the gateway's
  resident memory grows less than 10% from the end of warm-up to the end, and every page is free
  afterwards (`bench/soak.py` runs the same load for minutes).
- Slow clients (one sending its request head byte by byte, one stalling mid-body, one never
  reading its stream) hold only their own connections: a normal request completes meanwhile, the
  gateway closes the stalled ones with 408 once its deadlines pass, and everything they held is
  released when they go. These run against a second gateway on the same router with 2-second
  deadlines instead of the default 30, so the test need not wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import time
from pathlib import Path

import openai
import pytest

from bench.soak import rss_mib, run_load, wait_for_free_pages, worker_pages
from deploy.launcher import start_process

MODEL = "moonshotai/Kimi-K2.5"
NUM_CLIENTS = 64
DURATION_S = 60.0
MAX_TOKENS = 16  # 64 streams of ~60 tokens each fit the 512 pages of the test stack
CLIENT_DEADLINE_S = 2.0


def test_64_streaming_clients_for_a_minute(stack):
    pages_before = worker_pages(stack)
    gateway = stack.child("gateway").process.pid
    load = asyncio.run(
        run_load(
            stack.base_url,
            NUM_CLIENTS,
            DURATION_S,
            MAX_TOKENS,
            rss=lambda: {"gateway": rss_mib(gateway)},
        )  # fmt: skip
    )
    summary = load.summary()
    print(f"\nload: {json.dumps(summary)}")
    assert load.num_errors == 0, load.error_samples
    assert load.num_requests >= NUM_CLIENTS
    warm, end = load.rss_warm_mib["gateway"], load.rss_end_mib["gateway"]
    assert end < 1.10 * warm, (warm, end)
    pages_after = wait_for_free_pages(stack, within_s=5.0)
    assert pages_after == pages_before
    print(f"pages before {pages_before}, after {pages_after}")


# ---------------------------------------------------------------- slow clients


@pytest.fixture(scope="module")
def strict_gateway(stack):
    """A second gateway process on the stack's router with 2-second client deadlines."""
    args = ["--router", stack.router_address, "--port", "0",
            "--head-timeout", str(CLIENT_DEADLINE_S), "--body-timeout", str(CLIENT_DEADLINE_S)]  # fmt: skip
    child = start_process("gateway-strict", "router.gateway_main", args, "127.0.0.1")
    try:
        child.await_ready(120)
        yield child
    finally:
        child.signal(signal.SIGTERM)
        child.wait(10)
        child.close()


def _established(pid: int, port: int) -> int:
    """Connections `pid` accepted on `port` that are still ESTABLISHED (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            count += fields[3] == "01" and fields[9] in inodes and local_port == port
    return count


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    return sock


def _request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data


def _read_until_closed(sock: socket.socket, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or `within_s` passes)."""
    received, deadline = b"", time.monotonic() + within_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if not ready:
            continue
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, BlockingIOError):
            piece = b""
        if not piece:
            return received
        received += piece
    raise AssertionError(f"the server kept the connection for {within_s} s: {received[:200]!r}")


def _open_slow_clients(port: int, hello: dict):
    """20 connections for request heads sent a byte at a time (never completed), 5 whose body
    stops after its first bytes, and 4 streams of 200 tokens that are never read (a small
    receive buffer fills at once)."""
    dripping = [_connect(port) for _ in range(20)]
    stalled = [_connect(port) for _ in range(5)]
    for sock in stalled:
        sock.sendall(_request(hello)[:-10])
    unread = []
    for _ in range(4):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_request({**hello, "stream": True, "max_tokens": 200, "ignore_eos": True}))
        unread.append(sock)
    return dripping, stalled, unread


def test_slow_clients_do_not_block_others(stack, strict_gateway):
    port, pid = strict_gateway.port, strict_gateway.process.pid
    baseline = _established(pid, port)
    hello = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    started = time.monotonic()

    dripping, stalled, unread = _open_slow_clients(port, hello)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                           timeout=30)  # fmt: skip
    latencies, answers, answered_after = [], {}, []
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 400
    for step in range(50):  # about 5 s of dripping, well past the 2 s deadline
        for sock in dripping + stalled:
            if sock in answers:
                continue
            if select.select([sock], [], [], 0)[0]:  # answered: read before sending more
                answered_after.append(time.monotonic() - started)
                answers[sock] = _read_until_closed(sock, within_s=1.0)
            elif sock in dripping:
                sock.send(head[step : step + 1])
        if step % 10 == 0:  # a normal request meanwhile
            t = time.monotonic()
            answer = client.chat.completions.create(model=MODEL, messages=hello["messages"],
                                                    max_tokens=2)  # fmt: skip
            latencies.append(time.monotonic() - t)
            assert answer.usage.completion_tokens == 2
        time.sleep(0.1)
    client.close()
    print(f"\nnormal requests beside slow clients: {[round(s, 2) for s in latencies]} s")
    assert max(latencies) < 10.0

    for sock in dripping + stalled:
        if sock not in answers:
            answers[sock] = _read_until_closed(sock, within_s=CLIENT_DEADLINE_S + 5)
        sock.close()
    for answer in answers.values():
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code": "request_timeout"' in answer or b'"code":"request_timeout"' in answer
    assert len(answered_after) == len(answers)  # all seen while still dripping
    print(f"slow senders answered 408 and closed {min(answered_after):.1f}-"
          f"{max(answered_after):.1f} s after they connected")  # fmt: skip

    # The unread streams' generation ended without them; their pages are free already.
    pages = wait_for_free_pages(stack, within_s=60.0)
    assert all(free == total for free, total in pages.values()), pages
    for sock in unread:
        sock.close()
    deadline = time.monotonic() + 5.0
    while _established(pid, port) > baseline:
        assert time.monotonic() < deadline, (_established(pid, port), baseline)
        time.sleep(0.1)
    print(f"connections back to {baseline}; pages {pages}")
