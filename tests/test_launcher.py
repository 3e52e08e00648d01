"""`kimiserve up` as a user runs it: serves, then Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from stack_utils import free_port


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    return {p for p, parent in pairs if parent == pid}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return bool(stat.stdout.strip()) and not stat.stdout.strip().startswith("Z")


def test_up_serves_and_ctrl_c_leaves_no_orphan(tiny_checkpoint):
    port, control = free_port(), f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--model-path", str(tiny_checkpoint),
           "--port", str(port), "--num-pages", "256",
           "--control-port", control.rsplit(":", 1)[1]]  # fmt: skip
    up = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models["data"][0]["id"] == "moonshotai/Kimi-K2.5"
        cli = [sys.executable, "-m", "deploy.cli"]
        scaled = subprocess.run([*cli, "scale", "--control", control, "--prefill", "2"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert "'prefill': 2" in scaled.stdout, scaled.stderr
        status = subprocess.run([*cli, "status", "--control", control], capture_output=True,
                                text=True, timeout=30).stdout  # fmt: skip
        assert [line.split()[:3] for line in status.splitlines()[1:]] == [
            ["decode-0", "decode", "ready"],
            ["prefill-0", "prefill", "ready"],
            ["prefill-1", "prefill", "ready"],
            ["vision-0", "vision", "ready"],
        ], status
        children = _children(up.pid)
        assert len(children) == 6  # vision, decode, 2 prefill, router, gateway
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        time.sleep(0.5)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
