"""Helpers for tests that start real stacks of processes on 127.0.0.1."""

from __future__ import annotations

import socket

from deploy.launcher import LocalStack, StackConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(model_path, **overrides) -> LocalStack:
    config = StackConfig(model_path=str(model_path), port=free_port(), num_pages=512, **overrides)
    stack = LocalStack(config)
    stack.start()
    return stack


def router_address(stack: LocalStack) -> str:
    router = next(c for c in stack.children if c.name == "router")
    return f"127.0.0.1:{router.port}"
