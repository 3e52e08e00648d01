"""Security properties of the product code: no pickle on any socket, and every listener of a
running stack bound to 127.0.0.1 by default."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from stack_utils import start_stack

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [
    "proto",
    "router",
    "prefill_worker",
    "decode_worker",
    "vision_worker",
    "shared",
    "deploy",
]
FORBIDDEN_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
FORBIDDEN_CALLS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized", "load"}


def _product_files() -> list[Path]:
    return [p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name]


def test_no_pickle_in_product_code():
    offences = []
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                offences += [f"{path}: imports {n}" for n in names
                             if n.split(".")[0] in FORBIDDEN_MODULES]  # fmt: skip
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                owner = ast.unparse(node.value)
                if node.attr != "load" or owner in ("torch", "pickle", "numpy", "np"):
                    offences.append(f"{path}:{node.lineno}: {owner}.{node.attr}")
    assert offences == []


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets this process listens on (from /proc)."""
    inodes = set()
    for fd in (Path(f"/proc/{pid}/fd")).iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1])
    return found


def _is_loopback(address: str) -> bool:
    host = address.split(":")[0]
    loopback = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
    return host in loopback  # 127.0.0.1, ::1, ::ffff:127.0.0.1


def test_every_listener_is_on_loopback(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint)
    try:
        import openai

        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(  # builds the KV pair (gloo listens too)
            model="moonshotai/Kimi-K2.5", messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
        )  # fmt: skip
        report = {c.name: _listening(c.process.pid) for c in stack.children}
    finally:
        stack.stop()
    assert all(report.values()), report  # every process listens somewhere
    exposed = {name: [a for a in addrs if not _is_loopback(a)] for name, addrs in report.items()}
    assert exposed == {name: [] for name in report}, exposed
