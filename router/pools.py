"""Worker pools as the router sees them: live workers with health state, and routing policies.

Workers register with the router (`Control.Register`) and send heartbeats with their load; a
worker whose heartbeats stop for `lost_after_s` leaves the rotation (state "lost") until it
beats again. Workers given on the router's command line are static: they never expire, but one
that a call found unreachable is "lost" until its channel connects again (`revive_static`: a
restart on the same address brings it back). A "draining" worker finishes what it has and takes
nothing new. Vision workers register too (or are static, from `--vision`); a vision worker's
`num_pinned` counts the requests whose images it holds for the router, which a drain waits for.

Policies (`--policy`): `round_robin`; `least_load` (fewest requests in flight, then most free
pages); `prefix_aware` (prefill: the worker that most recently served the longest matching
prompt prefix, else least load; decode: least load).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import math
import time
from collections import OrderedDict

import grpc

from proto import control_pb2 as ctl
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.wire import GRPC_OPTIONS

POLICIES = ("round_robin", "least_load", "prefix_aware")
PREFIX_BLOCK = 16  # tokens per hashed prefix block
MAX_PREFIX_ENTRIES = 100_000


@dataclasses.dataclass
class Worker:
    role: str
    worker_id: str
    address: str
    channel: grpc.aio.Channel
    stub: object
    static: bool = False
    state: str = "ready"
    load: ctl.WorkerLoad = dataclasses.field(default_factory=ctl.WorkerLoad)
    last_heartbeat: float = dataclasses.field(default_factory=time.monotonic)
    num_inflight: int = 0
    num_served: int = 0
    num_pinned: int = 0  # vision: requests whose embeddings it holds until they end

    def info(self) -> ctl.WorkerInfo:
        return ctl.WorkerInfo(
            role=self.role, worker_id=self.worker_id, address=self.address, state=self.state,
            load=self.load, num_inflight=self.num_inflight, num_served=self.num_served,
            seconds_since_heartbeat=time.monotonic() - self.last_heartbeat,
            num_pinned=self.num_pinned,
        )  # fmt: skip


def prefix_hashes(token_ids: list[int]) -> list[bytes]:
    """Chained hashes of each full block of `PREFIX_BLOCK` tokens (a prefix's identity)."""
    hashes, digest = [], b""
    for start in range(0, len(token_ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        block = ",".join(map(str, token_ids[start : start + PREFIX_BLOCK])).encode()
        digest = hashlib.blake2b(digest + block, digest_size=16).digest()
        hashes.append(digest)
    return hashes


class PrefixIndex:
    """An approximate radix tree: prefix block hash -> the worker that last prefilled it (LRU)."""

    def __init__(self, max_entries: int = MAX_PREFIX_ENTRIES) -> None:
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self.max_entries = max_entries

    def match(self, hashes: list[bytes], candidates: set[str]) -> tuple[str | None, int]:
        """The candidate holding the longest prefix, and how many blocks it matches."""
        best, length = None, 0
        for i, digest in enumerate(hashes):
            owner = self._owner.get(digest)
            if owner is None:
                break
            if owner in candidates:
                best, length = owner, i + 1
        return best, length

    def record(self, hashes: list[bytes], worker_id: str) -> None:
        for digest in hashes:
            self._owner[digest] = worker_id
            self._owner.move_to_end(digest)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)


class Pool:
    """The live workers of one role."""

    def __init__(self, role: str, stub_class: type, policy: str = "round_robin") -> None:
        assert policy in POLICIES, f"unknown policy {policy!r}; choose from {POLICIES}"
        self.role = role
        self.stub_class = stub_class
        self.policy = policy
        self._workers: dict[str, Worker] = {}
        self._turn = itertools.count()
        self.prefixes = PrefixIndex()
        self.num_queued = 0  # samples waiting for a worker of this pool to have room
        self._closing: set[asyncio.Task] = set()  # channels of replaced workers, closing

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def add(self, worker_id: str, address: str, static: bool = False) -> Worker:
        """Adds a worker, or takes back one registering again (a new process) at its old
        address, keeping its counts."""
        old = self._workers.get(worker_id)
        if old is not None and old.address == address:
            # The old channel may be waiting out a reconnect backoff after the old process died,
            # failing calls at once for seconds more: the new process gets a channel of its own.
            self._close_later(old.channel)
            old.channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            old.stub = self.stub_class(old.channel)
            old.state, old.last_heartbeat = "ready", time.monotonic()
            return old
        channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        worker = Worker(self.role, worker_id, address, channel, self.stub_class(channel), static)
        self._workers[worker_id] = worker
        return worker

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def remove(self, worker_id: str) -> Worker | None:
        return self._workers.pop(worker_id, None)

    def heartbeat(self, worker_id: str, load: ctl.WorkerLoad) -> bool:
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.load, worker.last_heartbeat = load, time.monotonic()
        if worker.state == "lost":
            worker.state = "ready"
        return True

    def expire(self, lost_after_s: float) -> list[Worker]:
        """Marks workers without a recent heartbeat as lost; returns the newly lost ones."""
        now, lost = time.monotonic(), []
        for worker in self._workers.values():
            stale = now - worker.last_heartbeat > lost_after_s
            if not worker.static and worker.state == "ready" and stale:
                worker.state = "lost"
                lost.append(worker)
        return lost

    def revive_static(self) -> list[Worker]:
        """Static workers marked lost whose channel is connected again; they are ready now.

        Asking for the state also makes an idle channel reconnect, so polling this is the probe.
        """
        revived = []
        for worker in self._workers.values():
            if worker.static and worker.state == "lost":
                connected = worker.channel.get_state(try_to_connect=True)
                if connected == grpc.ChannelConnectivity.READY:
                    worker.state = "ready"
                    revived.append(worker)
        return revived

    def pick(self, prompt_ids: list[int] | None = None, exclude: frozenset[str] = frozenset()
             ) -> Worker | None:  # fmt: skip
        ready = [w for w in self._workers.values() if w.state == "ready"]
        ready = [w for w in ready if w.worker_id not in exclude] or ready
        if not ready:
            return None
        if self.policy == "round_robin":
            return ready[next(self._turn) % len(ready)]
        if self.policy == "prefix_aware" and self.role == "prefill" and prompt_ids:
            hashes = prefix_hashes(prompt_ids)
            owner, _ = self.prefixes.match(hashes, {w.worker_id for w in ready})
            worker = self._workers[owner] if owner else self._least_loaded(ready)
            self.prefixes.record(hashes, worker.worker_id)
            return worker
        return self._least_loaded(ready)

    def _least_loaded(self, ready: list[Worker]) -> Worker:
        def cost(w: Worker) -> tuple[int, int, int]:
            # The router's own count is current; the heartbeat's may be a second old, so it only
            # wins when the worker has more work than this router gave it (another router, say).
            queued = max(w.num_inflight, w.load.num_running + w.load.num_waiting)
            # Free pages in eighths: a stale heartbeat taken mid-request must not outweigh the
            # tie-break on requests served, or a burst piles onto whichever worker reported last.
            free = w.load.num_free_pages / w.load.num_total_pages if w.load.num_total_pages else 1
            return (queued, -math.ceil(free * 8), w.num_served)

        return min(ready, key=cost)

    async def close(self) -> None:
        for worker in self._workers.values():
            await worker.channel.close()


STUBS = {
    "prefill": pb_grpc.PrefillWorkerStub,
    "decode": pb_grpc.DecodeWorkerStub,
}


def make_pools(prefill: list[str], decode: list[str], policy: str = "round_robin"
               ) -> tuple[Pool, Pool]:  # fmt: skip
    """Pools with the static workers given on the command line."""
    pools = []
    for role, addresses in (("prefill", prefill), ("decode", decode)):
        pool = Pool(role, STUBS[role], policy)
        for i, address in enumerate(addresses):
            pool.add(f"{role}-static-{i}", address, static=True)
        pools.append(pool)
    return pools[0], pools[1]
