"""Ray launcher: `kimiserve up --launcher ray` runs the worker pools as Ray actors on a cluster.

`LocalStack` keeps its start order, scaling and supervision; only where workers run changes. It
asks a `RaySpawner` instead of starting processes on this machine:

- Each worker (vision, prefill, decode) gets its own placement group with one bundle per rank,
  `{"CPU": 1, "GPU": num_gpus_per_worker}`, packed onto one node (STRICT_PACK keeps the expert
  parallel ranks of one worker together), and one `WorkerHost` actor per bundle.
- The actor starts the worker module as a subprocess on its node, bound to the node's Ray address
  (the one `ray start --node-ip-address` was held to), and returns that address with the port
  the worker printed as `READY <port>`.
- The router and the gateway stay local processes of the launcher, which runs on the head node:
  the gateway serves on the operator's `--host` / `--port`, and the router listens on the head's
  Ray address so that workers on other nodes can register with it.

Stopping sends SIGTERM to each worker's process group through its actor (SIGKILL after the grace
period), then kills the actors and removes their placement groups. If the launcher dies, Ray
kills its actors (they are not detached) and Linux sends each worker SIGTERM when its actor dies.

Ray is imported only here, and only when this launcher is chosen.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import subprocess
import sys
import time
from typing import Any

from deploy.launcher import Child, StackConfig

logger = logging.getLogger(__name__)

# `python -c` program for a worker: ask Linux for SIGTERM when the parent (the actor) dies, then
# become `python -m <module> <args>` (the request survives exec). Unlike `preexec_fn`, this is
# safe in a process with threads, and Ray actors have many.
_EXEC_TIED_TO_PARENT = (
    "import os, sys; from deploy.launcher import _die_with_parent; _die_with_parent(); "
    "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[1:]])"
)
# A single machine's Ray started by the launcher advertises this many CPUs, so that every worker
# rank (one CPU each) gets a bundle; they share the real cores as the local launcher's do.
_LOCAL_RAY_NUM_CPUS = 64
_CALL_TIMEOUT_S = 30.0  # for a control call to an actor (poll, signal)


class WorkerHost:
    """A Ray actor that runs one worker process (one rank) on its node and answers for it.

    Calls: `start` once, which blocks until the worker serves and returns (node address, port);
    then `poll`, `signal` and `wait` from other threads of the actor (`max_concurrency` > 1), so
    a stop can reach a worker that is still starting.
    """

    def __init__(self) -> None:
        self.child: Child | None = None

    def start(self, name: str, module: str, args: list[str], timeout: float) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        args = _with_host(args, host)
        cmd = [sys.executable, "-c", _EXEC_TIED_TO_PARENT, module, *args]
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.child = Child(name, process, module=module, args=args, host=host)
        self.child.await_ready(timeout)
        return host, self.child.port

    def poll(self) -> int | None:
        return None if self.child is None else self.child.poll()

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.signal(sig)

    def wait(self, timeout: float | None) -> int | None:
        """The exit code, 0 if nothing was started, None if still running after `timeout`."""
        if self.child is None:
            return 0
        try:
            return self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclasses.dataclass
class RayChild(Child):
    """A worker whose rank processes run under `WorkerHost` actors (rank 0 first), in one
    placement group. Rank 0's address is the worker's address."""

    ranks: list[Any] = dataclasses.field(default_factory=list)  # actor handles
    started: list[Any] = dataclasses.field(default_factory=list)  # refs of each rank's `start`
    group: Any = None  # the placement group
    placed: bool = False  # the group is ready, so every rank's actor exists

    def await_ready(self, timeout: float) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        deadline = time.monotonic() + timeout
        if not self.group.wait(timeout_seconds=timeout):
            raise TimeoutError(
                f"no node has room for {self.name}: {self.group.bundle_specs} on one node; "
                f"free in the cluster: {ray.available_resources()}"
            )
        self.placed = True
        try:
            addresses = ray.get(self.started, timeout=max(1.0, deadline - time.monotonic()))
        except GetTimeoutError:
            raise TimeoutError(f"{self.name} not ready within {timeout}s") from None
        except RayError as exc:
            raise RuntimeError(f"{self.name} failed to start: {exc}") from None
        self.host, self.port = addresses[0]

    def poll(self) -> int | None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if not self.placed:
            return None
        try:
            codes = ray.get([r.poll.remote() for r in self.ranks], timeout=_CALL_TIMEOUT_S)
        except RayActorError:
            return -1  # the actor is gone (its node was lost): so is its worker
        except GetTimeoutError:
            return None
        return next((code for code in codes if code is not None), None)

    def signal(self, sig: int) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self.placed:
            try:
                ray.get([r.signal.remote(sig) for r in self.ranks], timeout=_CALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as exc:
                logger.warning("could not signal %s: %s", self.name, exc)

    def wait(self, timeout: float | None) -> int:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if not self.placed:
            return 0
        refs = [r.wait.remote(timeout) for r in self.ranks]
        try:
            codes = ray.get(refs, timeout=None if timeout is None else timeout + _CALL_TIMEOUT_S)
        except RayActorError:
            return -1
        except GetTimeoutError:
            codes = [None]
        if any(code is None for code in codes):
            raise subprocess.TimeoutExpired(self.name, timeout)
        return codes[0]

    def close(self) -> None:
        """Kills the actors (a worker still running gets SIGTERM from Linux) and frees the group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        remove_placement_group(self.group)


class RaySpawner:
    """Places workers on a Ray cluster (see the module docstring): the `Spawner` of
    `--launcher ray`. Connects to `config.ray_address`, or starts Ray on this machine."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        ray = _connect(config)
        self.head_host = ray.util.get_node_ip_address()
        self._host_actor = ray.remote(WorkerHost)
        logger.info("Ray cluster: %s; router and gateway stay on %s", ray.cluster_resources(),
                    self.head_host)  # fmt: skip

    def _num_ranks(self, module: str) -> int:
        """Processes of one worker, each in its own bundle of the worker's placement group."""
        # Expert parallelism: {"decode_worker.server": self.config.decode_ep_size}.
        return {"decode_worker.server": 1}.get(module, 1)

    def spawn(self, name: str, module: str, args: list[str]) -> RayChild:
        """Reserves the worker's placement group and starts its ranks; returns at once.

        With more than one rank, rank r also gets `--ep-rank r --ep-size n`; the ranks share a
        node, so they can rendezvous on the `--host` they are given."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        num_ranks, num_gpus = self._num_ranks(module), self.config.num_gpus_per_worker
        bundle = {"CPU": 1, "GPU": num_gpus} if num_gpus else {"CPU": 1}
        group = placement_group([bundle] * num_ranks, strategy="STRICT_PACK")
        child = RayChild(name, None, module=module, args=args, group=group)
        for rank in range(num_ranks):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            actor = self._host_actor.options(
                num_cpus=1, num_gpus=num_gpus, max_concurrency=4, scheduling_strategy=strategy
            ).remote()
            rank_args = args if num_ranks == 1 else [*args, "--ep-rank", str(rank),
                                                     "--ep-size", str(num_ranks)]  # fmt: skip
            timeout = self.config.startup_timeout
            child.started.append(actor.start.remote(name, module, rank_args, timeout))
            child.ranks.append(actor)
        return child

    def close(self) -> None:
        """Disconnects from the cluster; a Ray this spawner started stops with it."""
        import ray

        ray.shutdown()


def _with_host(args: list[str], host: str) -> list[str]:
    """`args` with the value of `--host` replaced: a worker binds to its own node's address."""
    i = args.index("--host")
    return [*args[: i + 1], host, *args[i + 2 :]]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _connect(config: StackConfig):
    """Connects to the cluster at `ray_address`, or starts Ray on `internal_host`; returns `ray`.

    Token authentication is Ray's: a Ray started here turns it on and makes a token
    (`~/.ray/auth_token`) unless RAY_AUTH_MODE says otherwise; connecting to a cluster that
    requires it needs RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or `~/.ray/auth_token`) in this process's environment.
    """
    address = config.ray_address
    host = (address or config.internal_host).rsplit(":", 1)[0].strip("[]")
    if _is_loopback(host):
        # On Linux Ray replaces a loopback node address with this machine's LAN address unless
        # its multi-machine mode is off; this variable is Ray's switch for that, and Ray reads it
        # when it is imported, so it must be set first.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if address:
        ray.init(address=address)
    else:
        ray.init(_node_ip_address=config.internal_host, num_cpus=_LOCAL_RAY_NUM_CPUS,
                 include_dashboard=False)  # fmt: skip
    node_host = ray.util.get_node_ip_address()
    if _is_loopback(host) and not _is_loopback(node_host):
        ray.shutdown()
        raise RuntimeError(
            f"Ray took {node_host} as this node's address instead of {host}: it was imported "
            "before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 could be set"
        )
    return ray
