"""Worker pools as the router sees them: addresses, gRPC stubs and a routing policy.

Limitation: pools are fixed at start from the launcher's command line; workers do not yet
register themselves or send heartbeats, so a lost worker stays in rotation.
"""

from __future__ import annotations

import dataclasses
import itertools

import grpc

from proto import kimiserve_pb2_grpc as pb_grpc
from shared.wire import GRPC_OPTIONS


@dataclasses.dataclass
class Worker:
    worker_id: str
    address: str
    channel: grpc.aio.Channel
    stub: object
    num_inflight: int = 0


class Pool:
    """A round-robin pool of one role's workers."""

    def __init__(self, role: str, stub_class: type, addresses: list[str]) -> None:
        self.role = role
        self.workers = []
        for i, address in enumerate(addresses):
            channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            self.workers.append(Worker(f"{role}-{i}", address, channel, stub_class(channel)))
        self._cycle = itertools.cycle(range(len(self.workers))) if self.workers else None

    def pick(self) -> Worker | None:
        if self._cycle is None:
            return None
        return self.workers[next(self._cycle)]

    async def close(self) -> None:
        for worker in self.workers:
            await worker.channel.close()


def make_pools(prefill: list[str], decode: list[str]) -> tuple[Pool, Pool]:
    return (
        Pool("prefill", pb_grpc.PrefillWorkerStub, prefill),
        Pool("decode", pb_grpc.DecodeWorkerStub, decode),
    )
