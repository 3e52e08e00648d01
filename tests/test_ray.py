"""The Ray launcher: `deploy/cluster.yaml` passes Ray's own cluster-config validation, and
`kimiserve up --launcher ray` serves chat through workers placed as Ray actors.

The end-to-end tests start one Ray head for the module with `ray start --head --block`, held to
127.0.0.1 and with token authentication on (a token of our own in a temporary file, handed over
with RAY_AUTH_TOKEN_PATH, so ~/.ray is never touched); `kimiserve up` connects to it with that
token. Stopping the head process stops that Ray instance only.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from stack_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MODEL = "moonshotai/Kimi-K2.5"
WORKER_MODULES = ("vision_worker.server", "prefill_worker.server", "decode_worker.server")


def _cluster_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation():
    """What `ray up` does before it touches a node: fill in the defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster_config()))

    broken = copy.deepcopy(_cluster_config())
    broken["worker_ip"] = ["10.0.0.9"]  # a misspelt field: the schema allows no unknown ones
    with pytest.raises(Exception, match="worker_ip"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_holds_nodes_to_their_address_with_token_auth():
    config = _cluster_config()
    assert config["provider"]["type"] == "local"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if " ray start " in f" {c} " or "/ray start " in c]
        assert len(start) == 1, config[key]
        assert "RAY_AUTH_MODE=token" in start[0] and "--node-ip-address=$NODE_IP" in start[0]


def test_launcher_choice():
    from deploy.launcher import StackConfig, make_stack
    from deploy.ray_launcher import _with_host

    with pytest.raises(ValueError, match="launcher"):
        make_stack(StackConfig(model_path="unused", launcher="kubernetes"))
    # A worker placed by Ray binds to its node's address, whatever the launcher's default was.
    args = ["--worker-id", "decode-0", "--host", "127.0.0.1", "--num-pages", "8"]
    assert _with_host(args, "10.0.0.2") == ["--worker-id", "decode-0", "--host", "10.0.0.2",
                                            "--num-pages", "8"]  # fmt: skip


def _descendants(roots: set[int]) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    tree, grown = set(roots), True
    while grown:
        new = {pid for pid, parent in pairs if parent in tree} - tree
        tree, grown = tree | new, bool(new)
    return tree


def _args(pid: int) -> str:
    out = subprocess.run(
        ["ps", "-o", "stat=,args=", "-p", str(pid)], capture_output=True, text=True
    )
    stat, _, args = out.stdout.strip().partition(" ")
    return "" if not stat or stat.startswith("Z") else args.strip()


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket of `pids`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [(line.split()[3], int(pid)) for line in out.splitlines()
            for pid in re.findall(r"pid=(\d+)", line) if int(pid) in pids]  # fmt: skip


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} (exit {process.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with token authentication: (address, environment, process)."""
    # Short on purpose: Ray's socket paths under the temp dir must fit in 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="kray", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes one
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # fmt: skip
    port, log = free_port(), tmp / "head.log"
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--temp-dir={tmp / 'ray'}", "--include-dashboard=false", "--num-cpus=4",
           "--num-gpus=0", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}"]  # fmt: skip
    with log.open("w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: "block forever" in log.read_text(), 180, "ray head", head, log)
        yield f"127.0.0.1:{port}", env, head
    finally:
        head.terminate()  # `--block` stops the processes of this head, and only those
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(ray_head, tiny_checkpoint, tmp_path_factory):
    """`kimiserve up --launcher ray` against the head: (base URL, control address, process)."""
    address, env, _ = ray_head
    port, control = free_port(), free_port()
    log = tmp_path_factory.mktemp("ray_stack") / "up.log"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--launcher", "ray", "--ray-address", address,
           "--model-path", str(tiny_checkpoint), "--port", str(port), "--num-pages", "256",
           "--control-port", str(control)]  # fmt: skip
    with log.open("w") as out:
        up = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(healthy, 300, "kimiserve up --launcher ray", up, log)
        yield base_url, f"127.0.0.1:{control}", up
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


def _chat(client: openai.OpenAI, prompt: str, **kwargs):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": prompt}]  # fmt: skip
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24, **kwargs
    )


@pytest.mark.parametrize("prompt", ["Explain mixture-of-experts in one sentence.", "Hi"])
def test_chat_streaming_equals_non_streaming(stack, prompt):
    client = openai.OpenAI(base_url=f"{stack[0]}/v1", api_key="unused", max_retries=0)
    full = _chat(client, prompt)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == MODEL
    assert full.usage.completion_tokens == 24 or choice.finish_reason == "stop"
    reasoning = getattr(choice.message, "reasoning_content", None) or ""
    assert reasoning + (choice.message.content or "")  # random weights, but never empty

    chunks = list(_chat(client, prompt, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == (choice.message.content or "")
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_workers_are_ray_actors_on_loopback(ray_head, stack):
    """Each worker process is the child of a `WorkerHost` actor and registered on 127.0.0.1;
    every socket Ray itself listens on is bound to loopback."""
    _, control, up = stack
    status = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--control", control],
                            capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    rows = [line.split() for line in status.splitlines()[1:]]
    assert {r[1] for r in rows} >= {"prefill", "decode", "vision"}, status
    assert all(r[3].startswith("127.0.0.1:") for r in rows), status

    ray_tree = _descendants({ray_head[2].pid})
    workers = {p: _args(p) for p in ray_tree if any(f"-m {m} " in _args(p) for m in WORKER_MODULES)}
    assert len(workers) == 3, workers
    ppid = subprocess.run(["ps", "-o", "ppid=", "-p", ",".join(map(str, workers))],
                          capture_output=True, text=True).stdout.split()  # fmt: skip
    assert all(_args(int(p)).startswith("ray::WorkerHost") for p in ppid)
    ray_processes = ray_tree - set(workers)
    bound = _listeners(ray_processes)
    assert bound and all(re.match(r"(\[::ffff:)?127\.0\.0\.1\]?:", addr) for addr, _ in bound), (
        bound
    )


def test_a_wrong_token_is_refused(ray_head):
    """The head checks tokens: a driver with a wrong one is turned away (Ray keeps retrying for
    about 20 s before it gives up, so the first refusal is enough)."""
    address, env, _ = ray_head
    connect = f"import ray; ray.init(address={address!r})"
    driver = subprocess.Popen([sys.executable, "-c", connect], env={**env, "RAY_AUTH_TOKEN": "0" * 64},
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = iter(driver.stderr.readline, "")
        assert any("InvalidAuthToken" in line or "AuthenticationError" in line for line in lines)
    finally:
        driver.kill()
        driver.wait()
        driver.stderr.close()


def test_ctrl_c_leaves_no_worker_or_actor_behind(ray_head, stack):
    _, _, up = stack
    ours = _descendants({ray_head[2].pid, up.pid})
    served = {p for p in ours if re.search(r"ray::WorkerHost|-m (router|\w+_worker)\.", _args(p))}
    assert len(served) == 3 + 3 + 2  # actors, their workers, router and gateway
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 0
    deadline = time.monotonic() + 10
    while {p for p in served if _args(p)} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {p: _args(p) for p in served if _args(p)} == {}
