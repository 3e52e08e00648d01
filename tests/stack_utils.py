"""Helpers for tests that start real stacks of processes on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess

from deploy.launcher import LocalStack, StackConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(model_path, **overrides) -> LocalStack:
    overrides = {"num_pages": 512, **overrides}
    config = StackConfig(model_path=str(model_path), port=free_port(), **overrides)
    stack = LocalStack(config)
    stack.start()
    return stack


def router_address(stack: LocalStack) -> str:
    router = next(c for c in stack.children if c.name == "router")
    return f"127.0.0.1:{router.port}"


def curl_chat(base_url: str, body: str) -> dict:
    """POSTs the JSON text `body` to /v1/chat/completions with curl, as a user following a
    guide would; the parsed answer of a 200."""
    out = subprocess.run(
        ["curl", "-s", "-w", "\\n%{http_code}", f"{base_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "--data-binary", "@-"],
        input=body, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "200", payload
    return json.loads(payload)
