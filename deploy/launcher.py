"""Local launcher: starts every pool as separate OS processes on this machine and supervises them.

Start order: the router, then the vision, decode and prefill workers together (each registers
with the router, then prints `READY <port>`), then the gateway. Ctrl-C (SIGINT) or SIGTERM stops all of them; each child runs in its own session and is
killed with its whole process group, so none is left orphaned. If any child dies, the others are
stopped and the launcher exits non-zero.

Workers start through a `Spawner`: as processes here (`ProcessSpawner`, the default) or as Ray
actors on a cluster (`--launcher ray`, `deploy/ray_launcher.py`). The router and the gateway are
always processes of this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Protocol

import grpc

from deploy.planner import PlannerConfig, run_planner
from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StackConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = "moonshotai/Kimi-K2.5"
    num_prefill: int = 1
    num_decode: int = 1
    num_vision: int = 1
    colocated: bool = False  # workers do prefill and decode in one process (benchmark baseline)
    num_pages: int = 2048
    page_size: int = 16
    kv_transfer_timeout: float = 30.0
    swap_space_bytes: int = -1  # decode: host memory for preempted requests (see WorkerConfig)
    api_key: str | None = None
    policy: str = "round_robin"
    fault_kv_delay: float = 0.0  # fault tests only (see WorkerConfig)
    prefix_cache: bool = True  # prefill workers reuse cached prompt prefixes (see WorkerConfig)
    decode_ep_size: int = 1  # ranks per decode worker (expert parallelism)
    expert_placement: str = ""  # JSON list expert -> rank; "" = round robin
    expert_stats: bool = False  # decode workers send tokens per expert (kimiserve:expert_tokens)
    context_length: int = 0  # 0: the model's, capped at the router's default
    # Seconds a request may take from arrival to its end before the router aborts it (504); the
    # router's default, as SGLang's model gateway has it. 0: no limit.
    request_timeout: float = 1800.0
    max_images_per_request: int = 16
    allowed_media_domains: tuple[str, ...] = ()  # image URL hosts (see shared.settings.MediaConfig)
    allow_private_media_urls: bool = False
    internal_host: str = "127.0.0.1"
    control_port: int = 30001  # `kimiserve scale` and `kimiserve status` talk to this port
    autoscale: bool = False  # let the load-based planner resize the prefill and decode pools
    autoscale_interval: float = 10.0
    min_prefill: int = 1
    max_prefill: int = 3
    min_decode: int = 1
    max_decode: int = 3
    # Seconds a vision worker that is scaled away keeps serving the embeddings of requests still
    # running; past it, a prefill worker that still needs them has the router encode them again.
    vision_drain_timeout: float = 60.0
    startup_timeout: float = 300.0
    launcher: str = "local"  # "local": every process here; "ray": workers as Ray actors
    ray_address: str | None = None  # ray: a running cluster's address; None starts Ray here
    num_gpus_per_worker: int = 0  # ray: GPUs each worker rank reserves
    worker_device: str = "cpu"  # prefill and decode workers' device ("cuda": bench/gpu_check.sh)
    worker_dtype: str = "float32"  # their weights and KV cache ("bfloat16" on a GPU)
    attention_backend: str = "auto"  # "torch", "flashinfer" or "auto" (see WorkerConfig)


@dataclasses.dataclass
class Child:
    """One started server process. The stack drives it only through the methods below, so a
    launcher that runs processes elsewhere subclasses it (`deploy/ray_launcher.py`)."""

    name: str
    process: subprocess.Popen | None
    port: int = 0
    module: str = ""
    args: list[str] = dataclasses.field(default_factory=list)
    retiring: bool = False  # being stopped on purpose (scaling down)
    host: str = "127.0.0.1"  # where it serves, with `port`

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def await_ready(self, timeout: float) -> None:
        """Blocks until the process printed `READY <port>`; sets `port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("READY "):
                    self.port = int(line.split()[1])
                    return
        raise TimeoutError(f"{self.name} not ready within {timeout}s")

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> None:
        """Sends `sig` to the child's whole process group."""
        _signal_group(self.process, sig)

    def wait(self, timeout: float | None) -> int:
        """The exit code; raises `subprocess.TimeoutExpired` if still running after `timeout`."""
        return self.process.wait(timeout)

    def close(self) -> None:
        """Releases what is left of a stopped child."""
        if self.process.stdout:
            self.process.stdout.close()


def start_process(name: str, module: str, args: list[str], host: str) -> Child:
    """`python -m module *args` in its own session, ended by Linux if this process dies."""
    cmd = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=_die_with_parent)  # fmt: skip
    return Child(name, process, module=module, args=args, host=host)


class Spawner(Protocol):
    """Where workers run. `spawn` starts one and returns at once (`Child.await_ready` waits);
    `head_host` is the address of this machine that spawned workers reach (the router listens
    there); `close` runs once, after every spawned child has stopped."""

    head_host: str

    def spawn(self, name: str, module: str, args: list[str]) -> Child: ...

    def close(self) -> None: ...


class ProcessSpawner:
    """Workers as processes on this machine: the local launcher's `Spawner`."""

    def __init__(self, config: StackConfig) -> None:
        self.head_host = config.internal_host

    def spawn(self, name: str, module: str, args: list[str]) -> Child:
        return start_process(name, module, args, self.head_host)

    def close(self) -> None:
        pass


ROLE_MODULES = {
    "vision": "vision_worker.server",
    "decode": "decode_worker.server",
    "prefill": "prefill_worker.server",
}
DRAIN_TIMEOUT_S = 120.0  # prefill and decode: in-flight requests finish within this
# `--colocated`: the decode pool's workers also serve prefill (`num_decode` of them, no prefill
# pool); they register under both roles.
COLOCATED_MODULE = "decode_worker.colocated_server"


class LocalStack:
    """The processes of one stack; use as a context manager or call `start` / `stop`."""

    def __init__(self, config: StackConfig, spawner: Spawner | None = None) -> None:
        self.config = config
        self.spawner = spawner or ProcessSpawner(config)
        self.children: list[Child] = []
        self.router_address = ""
        self._scale_lock = threading.Lock()
        self._stop_planner = threading.Event()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, args: list[str], host: str = "") -> Child:
        """A process on this machine (router, gateway)."""
        child = start_process(name, module, args, host or self.config.internal_host)
        self.children.append(child)
        return child

    def _spawn_worker(self, name: str, module: str, args: list[str]) -> Child:
        """A worker, wherever the spawner runs them."""
        child = self.spawner.spawn(name, module, args)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def kill(self, name: str) -> None:
        """Kills one child with SIGKILL (fault tests) and waits for it."""
        child = self.child(name)
        child.signal(signal.SIGKILL)
        child.wait(None)

    def restart(self, name: str) -> None:
        """Starts a dead child again on the same port, so its address stays valid."""
        old = self.child(name)
        assert old.process.poll() is not None, f"{name} is still running"
        self.children.remove(old)
        args = [a for a in old.args]
        if "--port" in args:
            args[args.index("--port") + 1] = str(old.port)
        else:
            args += ["--port", str(old.port)]
        self._await_ready(self._spawn(name, old.module, args))

    def _await_ready(self, child: Child) -> None:
        child.await_ready(self.config.startup_timeout)
        logger.info("%s ready on %s", child.name, child.address)

    def _worker_args(self, worker_id: str) -> list[str]:
        c = self.config
        return ["--model-path", c.model_path, "--worker-id", worker_id, "--host", c.internal_host,
                "--router-address", self.router_address,
                "--num-pages", str(c.num_pages), "--page-size", str(c.page_size),
                "--kv-transfer-timeout", str(c.kv_transfer_timeout),
                "--swap-space-bytes", str(c.swap_space_bytes),
                "--fault-kv-delay", str(c.fault_kv_delay),
                "--prefix-cache" if c.prefix_cache else "--no-prefix-cache",
                "--device", c.worker_device, "--dtype", c.worker_dtype,
                "--attention-backend", c.attention_backend] + (
                    ["--expert-stats"] if c.expert_stats else [])  # fmt: skip

    def _ranks(self, role: str, name: str) -> list[tuple[str, list[str]]]:
        """(name, args) of each process of one worker: one, or `decode_ep_size` ranks."""
        c = self.config
        if role == "vision":
            return [(name, self._vision_args(name))]
        size = c.decode_ep_size if role == "decode" else 1
        if size == 1:
            return [(name, self._worker_args(name))]
        with socket.socket() as probe:  # a free port for rank 0's group store
            probe.bind((c.internal_host, 0))
            rendezvous = f"{c.internal_host}:{probe.getsockname()[1]}"
        ranks = []
        for rank in range(size):
            rank_name = name if rank == 0 else f"{name}.r{rank}"
            args = self._worker_args(rank_name) + ["--ep-size", str(size), "--ep-rank", str(rank),
                                                   "--ep-rendezvous", rendezvous]  # fmt: skip
            if c.expert_placement:
                args += ["--expert-placement", c.expert_placement]
            ranks.append((rank_name, args))
        return ranks

    def _vision_args(self, worker_id: str) -> list[str]:
        c = self.config
        return ["--model-path", c.model_path, "--worker-id", worker_id,
                "--host", c.internal_host, "--router-address", self.router_address]  # fmt: skip

    def _media_args(self) -> list[str]:
        """The router's media settings (its vision workers register, as the others do)."""
        c = self.config
        private = "allow" if c.allow_private_media_urls else "no-allow"
        return [
            "--max-images-per-request", str(c.max_images_per_request),
            "--allowed-media-domains", ",".join(c.allowed_media_domains),
            f"--{private}-private-media-urls",
        ]  # fmt: skip

    def start(self) -> None:
        c = self.config
        try:
            head = self.spawner.head_host
            router_args = ["--model-path", c.model_path, "--host", head,
                           "--served-model-name", c.served_model_name, "--policy", c.policy,
                           "--context-length", str(c.context_length),
                           "--request-timeout", str(c.request_timeout)]  # fmt: skip
            router_args += self._media_args()
            router = self._spawn("router", "router.server", router_args, host=head)
            self._await_ready(router)
            self.router_address = router.address
            if c.colocated and c.decode_ep_size > 1:
                raise ValueError("--colocated workers run one rank: drop --decode-ep-size")
            sizes = {"vision": c.num_vision, "decode": c.num_decode,
                     "prefill": 0 if c.colocated else c.num_prefill}  # fmt: skip
            self.scale(sizes)
            gateway_args = ["--host", c.host, "--port", str(c.port), "--router",
                            self.router_address, "--served-model-name", c.served_model_name]  # fmt: skip
            if c.api_key:
                gateway_args += ["--api-key", c.api_key]
            self._await_ready(self._spawn("gateway", "router.gateway_main", gateway_args, c.host))
        except BaseException:
            self.stop()
            raise

    def workers(self, role: str) -> list[Child]:
        """Workers of a pool; an expert-parallel worker counts once (its rank 0)."""
        return [c for c in self.children if c.name.startswith(f"{role}-") and ".r" not in c.name]

    def ranks_of(self, worker: Child) -> list[Child]:
        """Rank 0 and the other ranks (`NAME.rK`) of one worker."""
        return [worker] + [c for c in self.children if c.name.startswith(f"{worker.name}.r")]

    def start_autoscaler(self) -> None:
        c = self.config
        config = PlannerConfig(interval=c.autoscale_interval, min_prefill=c.min_prefill,
                               max_prefill=c.max_prefill, min_decode=c.min_decode,
                               max_decode=c.max_decode)  # fmt: skip
        thread = threading.Thread(target=run_planner, args=(self, config, self._stop_planner),
                                  name="autoscaler", daemon=True)  # fmt: skip
        thread.start()
        logger.info("autoscaling prefill %d-%d, decode %d-%d every %.1fs", c.min_prefill,
                    c.max_prefill, c.min_decode, c.max_decode, c.autoscale_interval)  # fmt: skip

    def scale(self, sizes: dict[str, int]) -> dict[str, int]:
        with self._scale_lock:  # one change at a time (operator and planner)
            return self._scale(sizes)

    def _scale(self, sizes: dict[str, int]) -> dict[str, int]:
        """Grows or shrinks pools to `sizes` while serving; a leaving worker drains first.

        New workers register with the router before they report ready. Shrinking removes the
        newest workers: the router stops routing to one, waits for its requests to finish, then
        the process is stopped and forgotten.
        """
        spawned = []
        for role, size in sizes.items():
            current = self.workers(role)
            next_index = max((int(c.name.rsplit("-", 1)[1]) + 1 for c in current), default=0)
            for i in range(next_index, next_index + max(0, size - len(current))):
                for name, args in self._ranks(role, f"{role}-{i}"):
                    module = ROLE_MODULES[role]
                    if self.config.colocated and role == "decode":
                        module = COLOCATED_MODULE
                    spawned.append(self._spawn_worker(name, module, args))
            for child in current[size:][::-1] if size < len(current) else []:
                self._retire(child)
        for child in spawned:
            self._await_ready(child)
        if spawned or sizes:
            logger.info("pool sizes: %s", {r: len(self.workers(r)) for r in ROLE_MODULES})
        return {role: len(self.workers(role)) for role in ROLE_MODULES}

    def forget(self, child: Child) -> None:
        """Drops a worker process that died on its own from the stack and the router."""
        child.close()
        self.children.remove(child)
        with grpc.insecure_channel(self.router_address) as channel:
            ctl_grpc.ControlStub(channel).Remove(ctl.RemoveRequest(worker_id=child.name), timeout=5)

    def _retire(self, worker: Child) -> None:
        """Drains every rank of the worker (no new requests, in-flight ones finish), then stops
        them together: an expert-parallel rank cannot outlive its peers. A vision worker drains
        until no running request holds images on it (at most `vision_drain_timeout`)."""
        ranks = self.ranks_of(worker)
        vision = worker.name.startswith("vision-")
        timeout = self.config.vision_drain_timeout if vision else DRAIN_TIMEOUT_S
        with grpc.insecure_channel(self.router_address) as channel:
            control = ctl_grpc.ControlStub(channel)
            for child in ranks:
                drained = control.Drain(ctl.DrainRequest(worker_id=child.name, timeout_s=timeout))
                if not drained.drained:
                    logger.warning("%s still had %d requests after draining; stopping it anyway",
                                   child.name, drained.num_inflight)  # fmt: skip
            for child in ranks:
                child.retiring = True
                child.signal(signal.SIGTERM)
            for child in ranks:
                child.wait(10)
                child.close()
                control.Remove(ctl.RemoveRequest(worker_id=child.name))
                self.children.remove(child)
        logger.info("%s left its pool", worker.name)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def dead_child(self) -> Child | None:
        return next(
            (c for c in list(self.children) if not c.retiring and c.poll() is not None),
            None,
        )

    def stop(self, grace: float = 5.0) -> None:
        self._stop_planner.set()
        for child in reversed(self.children):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.signal(signal.SIGKILL)
                child.wait(None)
            child.close()
        self.children = []
        self.spawner.close()


def _die_with_parent() -> None:
    """In the child: ask Linux to send SIGTERM when the launcher dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


class LauncherServicer(ctl_grpc.LauncherServicer):
    """Lets `kimiserve scale` / `kimiserve status` reach a running `kimiserve up`."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def Scale(self, request: ctl.ScaleRequest, context) -> ctl.ScaleResponse:
        unknown = set(request.pool_sizes) - set(ROLE_MODULES)
        if unknown or any(n < 0 for n in request.pool_sizes.values()):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"bad pool sizes {dict(request.pool_sizes)}"
            )
        return ctl.ScaleResponse(pool_sizes=self.stack.scale(dict(request.pool_sizes)))

    def ListWorkers(self, request, context) -> ctl.ListWorkersResponse:
        with grpc.insecure_channel(self.stack.router_address) as channel:
            return ctl_grpc.ControlStub(channel).ListWorkers(request, timeout=10)


def serve_launcher_control(stack: LocalStack) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ctl_grpc.add_LauncherServicer_to_server(LauncherServicer(stack), server)
    server.add_insecure_port(f"{stack.config.internal_host}:{stack.config.control_port}")
    server.start()
    return server


def make_stack(config: StackConfig) -> LocalStack:
    """The stack `config.launcher` asks for (not started)."""
    if config.launcher == "ray":
        from deploy.ray_launcher import RaySpawner  # imports Ray, only when asked for

        return LocalStack(config, RaySpawner(config))
    if config.launcher != "local":
        raise ValueError(f"--launcher is 'local' or 'ray', not {config.launcher!r}")
    return LocalStack(config)


def run_until_interrupted(config: StackConfig) -> int:
    """`kimiserve up`: serve until Ctrl-C, or until the router or the gateway dies.

    A worker that dies leaves its pool (the router stops routing to it when its heartbeats
    stop) and the rest keeps serving; `kimiserve scale` can start a replacement.
    """
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with make_stack(config) as stack:
        control = serve_launcher_control(stack)
        if config.autoscale:
            stack.start_autoscaler()
        logger.info("kimiserve is up: %s/v1 (model %s); control on %s:%d", stack.base_url,
                    config.served_model_name, config.internal_host, config.control_port)  # fmt: skip
        while stop["signal"] is None:
            dead = stack.dead_child()
            if dead is not None and dead.name in ("router", "gateway"):
                logger.error("%s exited with %s; stopping", dead.name, dead.poll())
                return 1
            if dead is not None:
                logger.error("%s exited with %s; it leaves its pool", dead.name, dead.poll())
                stack.forget(dead)
            time.sleep(0.5)
        control.stop(grace=None)
    logger.info("stopped")
    return 0
