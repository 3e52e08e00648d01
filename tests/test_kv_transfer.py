"""KV transfer between real processes: two prefill-side and two decode-side processes.

The test process plays the router: it reserves pages on a decode process, then asks a prefill
process to push that request's KV. Each prefill process sends from several threads with the real
`KVSender`; each decode process hosts real `KVReceiver`s writing into a `KVCache` whose pages come
from a `PageAllocator`. The sender derives a request's KV from a seed per request id; the decode
side hashes the request's pages in `on_done`, frees them and reports the hash, so every page is
checked bit for bit against what was sent. A reservation may rearrange the request's page table
(`arrange`), so pieces land straight in the cache (runs of consecutive pages), through staging
(a fragmented table) or both.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import multiprocessing as mp
import os
import queue
import random
import threading
import time
import zlib

import pytest
import torch

from shared.checkpoint import TEXT_CONFIG
from shared.config import ModelConfig
from shared.kv_cache import KVCache, PageAllocator, pages_needed
from shared.kv_layout import MIN_DIRECT_TOKENS
from shared.kv_transfer import KVReceiver, KVSender, TransferError, chunk_tokens
from shared.messages import KVPushMsg

HOST = "127.0.0.1"
PAGE_SIZE = 16
DTYPE = torch.bfloat16
TIMEOUT = 20.0
NUM_SENDER_THREADS = 4
# cache kind (one receiver each) -> (layers, kv_lora_rank, rope_dim, pages)
KINDS = {"small": (3, 16, 8, 400), "kimi": (61, 512, 64, 160)}


def kv_for(request_id: str, num_tokens: int, layers: int, width: int) -> torch.Tensor:
    """The KV a prefill process sends for `request_id`: [layers, tokens, width], seeded by id."""
    gen = torch.Generator().manual_seed(zlib.crc32(request_id.encode()))
    return torch.randn(layers, num_tokens, width, generator=gen).to(DTYPE)


def digest(kv: torch.Tensor) -> str:
    return hashlib.sha256(kv.contiguous().view(torch.uint8).numpy()).hexdigest()


def width_of(receiver: str) -> tuple[int, int]:
    layers, rank, rope, _ = KINDS[receiver]
    return layers, rank + rope


def arrange(pages: list[int], layout: str) -> list[int]:
    """A request's page table from the pages the allocator gave it (consecutive ids here).

    "allocator": as given; "shuffled": no two neighbours consecutive, every piece is staged;
    "mixed": runs of 20, 1, 3 and 17 pages, in reverse order, so pieces of both kinds alternate.
    """
    if layout == "shuffled":
        return pages[::2] + pages[1::2]
    if layout == "mixed":
        runs, start = [], 0
        while start < len(pages):
            size = (20, 1, 3, 17)[len(runs) % 4]
            runs.append(pages[start : start + size])
            start += size
        return [page for run in reversed(runs) for page in run]
    return pages


# ---------------------------------------------------------------- prefill process


def prefill_node(index: int, commands: mp.Queue, results: mp.Queue) -> None:
    """Sends pushes from `commands` on several threads; reports ("sent", id, error)."""
    torch.set_num_threads(1)
    sender = KVSender(f"prefill-{index}", TIMEOUT)

    def work() -> None:
        while (command := commands.get()) is not None:
            request_id, num_tokens, layers, (rank, rope), rendezvous, control, pages = command
            push = KVPushMsg(pair_id="", request_id=request_id, num_tokens=num_tokens, tag=0,
                             first_token=0, first_logprob=0.0)  # fmt: skip
            ckv, kpe = kv_for(request_id, num_tokens, layers, rank + rope).split([rank, rope], -1)
            try:
                sender.send(rendezvous, control, push, ckv, kpe, pages, PAGE_SIZE)
                results.put(("sent", request_id, ""))
            except TransferError as exc:
                results.put(("sent", request_id, str(exc) or "TransferError"))

    threads = [threading.Thread(target=work) for _ in range(NUM_SENDER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    exit_now(results)


def exit_now(results: mp.Queue) -> None:
    """Flushes the reports and skips interpreter teardown (about a second with torch loaded)."""
    results.close()
    results.join_thread()
    os._exit(0)


# ---------------------------------------------------------------- decode process


class DecodeNode:
    """Caches, allocators and receivers of one decode process; owns reserved pages per request."""

    def __init__(self, results: mp.Queue) -> None:
        self.results = results
        self.lock = threading.Lock()
        self.owned: dict[str, tuple[str, list[int], int]] = {}  # id -> (kind, pages, tokens)
        base = ModelConfig.from_dict(TEXT_CONFIG).text
        self.caches, self.allocators = {}, {}
        for kind, (layers, rank, rope, num_pages) in KINDS.items():
            config = dataclasses.replace(base, num_hidden_layers=layers, kv_lora_rank=rank,
                                         qk_rope_head_dim=rope)  # fmt: skip
            self.caches[kind] = KVCache(config, num_pages, PAGE_SIZE, DTYPE, "cpu")
            self.allocators[kind] = PageAllocator(num_pages)
        self.receivers = {kind: KVReceiver(HOST, cache, self.resolve, self.on_done, TIMEOUT)
                          for kind, cache in self.caches.items()}  # fmt: skip

    def addresses(self) -> dict[str, tuple[str, str]]:
        return {name: (r.rendezvous_address, r.control_address)
                for name, r in self.receivers.items()}  # fmt: skip

    def reserve(self, kind: str, request_id: str, num_tokens: int, layout: str) -> list | None:
        """The request's page table, or None when the pages run short."""
        allocator = self.allocators[kind]
        with self.lock:
            if not allocator.can_allocate(pages_needed(num_tokens, PAGE_SIZE)):
                return None
            pages = arrange(allocator.allocate(pages_needed(num_tokens, PAGE_SIZE)), layout)
            self.owned[request_id] = (kind, pages, num_tokens)
        return pages

    def resolve(self, request_id: str) -> list[int] | None:
        with self.lock:
            entry = self.owned.get(request_id)
        return None if entry is None else entry[1]

    def on_done(self, request_id: str, push: KVPushMsg, error: str) -> None:
        with self.lock:
            entry = self.owned.pop(request_id, None)
        received = None
        if entry is not None:
            kind, pages, num_tokens = entry
            ckv, kpe = self.caches[kind].gather(pages, num_tokens)
            received = digest(torch.cat([ckv, kpe], dim=-1))
            self.allocators[kind].free(pages)
        self.results.put(("done", request_id, received, error))

    def status(self) -> dict:
        pair_threads = sum(t.name.startswith("kv-pair-") for t in threading.enumerate())
        return {"num_free": {k: a.num_free for k, a in self.allocators.items()},
                "pair_threads": pair_threads,
                "by_path": {k: dict(r.num_tokens_by_path) for k, r in self.receivers.items()}}  # fmt: skip


def decode_node(conn, results: mp.Queue) -> None:
    """Serves ("reserve", kind, id, tokens), ("status",) and ("stop",) on `conn`."""
    torch.set_num_threads(1)
    node = DecodeNode(results)
    conn.send(node.addresses())
    while (command := conn.recv())[0] != "stop":
        if command[0] == "reserve":
            conn.send(node.reserve(*command[1:]))
        else:
            conn.send(node.status())
    for receiver in node.receivers.values():
        receiver.close()
    exit_now(results)


# ---------------------------------------------------------------- the router side (this process)


@dataclasses.dataclass
class Outcome:
    sent_error: str | None = None  # set once the prefill side reported
    received: str | None = None
    done_error: str | None = None  # set once the decode side reported


class Cluster:
    def __init__(self) -> None:
        # Children fork from one server that imported torch once: four imports in parallel
        # take most of a minute on two busy cores.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "shared.kv_cache", "shared.kv_transfer"])
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(2)]
        self.prefills = [ctx.Process(target=prefill_node, args=(i, q, self.results), daemon=True)
                         for i, q in enumerate(self.commands)]  # fmt: skip
        self.conns, self.decodes = [], []
        for _ in range(2):
            parent, child = ctx.Pipe()
            self.conns.append(parent)
            self.decodes.append(ctx.Process(target=decode_node, args=(child, self.results),
                                            daemon=True))  # fmt: skip
        for process in self.prefills + self.decodes:
            process.start()
        self.addresses = [conn.recv() for conn in self.conns]
        self.outcomes: dict[str, Outcome] = collections.defaultdict(Outcome)

    def stop(self) -> None:
        for commands in self.commands:
            for _ in range(NUM_SENDER_THREADS):
                commands.put(None)
        for conn in self.conns:
            conn.send(("stop",))
        for process in self.prefills + self.decodes:
            process.join(10)
            if process.is_alive():
                process.kill()

    def reserve(self, decode: int, receiver: str, request_id: str, num_tokens: int,
                layout: str = "allocator") -> list[int] | None:  # fmt: skip
        self.conns[decode].send(("reserve", receiver, request_id, num_tokens, layout))
        return self.conns[decode].recv()

    def status(self, decode: int) -> dict:
        self.conns[decode].send(("status",))
        return self.conns[decode].recv()

    def send(self, prefill: int, decode: int, receiver: str, request_id: str, tokens: int,
             pages: list[int] | None = None) -> None:  # fmt: skip
        """Asks a prefill process to push; `pages`: the page table it is told (None: none)."""
        layers, rank, rope, _ = KINDS[receiver]
        rendezvous, control = self.addresses[decode][receiver]
        self.commands[prefill].put((request_id, tokens, layers, (rank, rope), rendezvous, control,
                                    pages))  # fmt: skip

    def poll(self, timeout: float) -> None:
        """Records the next report from either side."""
        event = self.results.get(timeout=timeout)
        outcome = self.outcomes[event[1]]
        if event[0] == "sent":
            outcome.sent_error = event[2]
        else:
            outcome.received, outcome.done_error = event[2], event[3]

    def wait(self, request_ids: list[str], timeout: float = 60.0) -> dict[str, Outcome]:
        """Waits until both sides reported on every request."""
        deadline = time.monotonic() + timeout
        while not all(self.finished(rid) for rid in request_ids):
            self.poll(max(0.1, deadline - time.monotonic()))
        return {rid: self.outcomes[rid] for rid in request_ids}

    def finished(self, request_id: str) -> bool:
        outcome = self.outcomes.get(request_id)
        return outcome is not None and None not in (outcome.sent_error, outcome.done_error)

    def transfer(self, prefill: int, decode: int, receiver: str, request_id: str, tokens: int,
                 layout: str = "allocator", tell_pages: bool = True) -> None:  # fmt: skip
        pages = self.reserve(decode, receiver, request_id, tokens, layout)
        assert pages is not None
        self.send(prefill, decode, receiver, request_id, tokens, pages if tell_pages else None)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    yield cluster
    cluster.stop()


def assert_intact(outcomes: dict[str, Outcome], sizes: dict[str, int], receiver: str) -> None:
    for request_id, outcome in outcomes.items():
        assert outcome.sent_error == "" and outcome.done_error == "", (request_id, outcome)
        expected = digest(kv_for(request_id, sizes[request_id], *width_of(receiver)))
        assert outcome.received == expected, f"{request_id}: KV differs from what was sent"


def test_concurrent_pushes_on_four_pairs_arrive_bit_for_bit(cluster: Cluster) -> None:
    start = [cluster.status(d)["num_free"] for d in range(2)]
    rng = random.Random(0)
    sizes = {f"req-{i}": rng.randint(1, 300) for i in range(200)}
    waiting = collections.deque(enumerate(sizes.items()))
    while waiting:  # pages run short on purpose: a reservation waits for a finished request
        i, (request_id, tokens) = waiting[0]
        prefill, decode = i % 2, (i // 2) % 2
        pages = cluster.reserve(
            decode, "small", request_id, tokens, ("allocator", "shuffled")[i % 2]
        )
        if pages is None:
            cluster.poll(timeout=TIMEOUT)
            continue
        waiting.popleft()
        cluster.send(prefill, decode, "small", request_id, tokens, pages)

    assert_intact(cluster.wait(list(sizes)), sizes, "small")
    assert [cluster.status(d)["num_free"] for d in range(2)] == start


def tokens_by_path(cluster: Cluster, receiver: str) -> dict[str, int]:
    """Tokens both decode processes' `receiver` landed directly and through staging so far."""
    paths = [cluster.status(d)["by_path"][receiver] for d in range(2)]
    return {path: sum(p[path] for p in paths) for path in ("direct", "staged")}


# page table layout, whether the sender is told the table -> which paths the receiver takes
CASES = {
    "runs": ("allocator", True, {"direct"}),
    "fragmented": ("shuffled", True, {"direct", "staged"}),  # direct: one-page pieces only
    "mixed": ("mixed", True, {"direct", "staged"}),
    "untold": ("allocator", False, {"direct"}),  # chunks cut blind still land on the runs
}


@pytest.mark.parametrize("case", CASES)
def test_multi_chunk_pushes_in_kimi_layout_arrive_bit_for_bit(cluster: Cluster, case) -> None:
    layout, tell_pages, paths = CASES[case]
    chunk = chunk_tokens(*width_of("kimi"), DTYPE)
    start, by_path = (
        [cluster.status(d)["num_free"] for d in range(2)],
        tokens_by_path(cluster, "kimi"),
    )
    # Several chunks, a ragged last chunk and a last page that is not full; all four pairs.
    sizes = {f"{case}-{i}": n for i, n in enumerate([2 * chunk + 77, chunk + 1, 2 * chunk])}
    sizes[f"{case}-3"] = chunk + 5
    for i, (request_id, tokens) in enumerate(sizes.items()):
        cluster.transfer(i % 2, (i // 2) % 2, "kimi", request_id, tokens, layout, tell_pages)

    assert_intact(cluster.wait(list(sizes)), sizes, "kimi")
    assert [cluster.status(d)["num_free"] for d in range(2)] == start
    moved = {k: v - by_path[k] for k, v in tokens_by_path(cluster, "kimi").items()}
    assert {path for path, n in moved.items() if n} == paths, moved
    assert sum(moved.values()) == sum(sizes.values())
    if case == "fragmented":  # the one-page last chunks of chunk + 1 and chunk + 5 tokens
        assert moved["direct"] == 1 + 5


def test_a_stale_page_table_still_arrives_bit_for_bit(cluster: Cluster) -> None:
    """The sender cuts along runs it was told of; the receiver's own table is fragmented."""
    by_path = tokens_by_path(cluster, "kimi")
    sizes = {"stale-0": 3 * MIN_DIRECT_TOKENS + 9, "stale-1": 40}
    for request_id, tokens in sizes.items():
        pages = cluster.reserve(0, "kimi", request_id, tokens, "shuffled")
        cluster.send(0, 0, "kimi", request_id, tokens, sorted(pages))

    assert_intact(cluster.wait(list(sizes)), sizes, "kimi")
    moved = {k: v - by_path[k] for k, v in tokens_by_path(cluster, "kimi").items()}
    assert moved == {"direct": 0, "staged": sum(sizes.values())}


@pytest.mark.parametrize(("receiver", "tokens"), [("small", 200), ("kimi", 1100)])
def test_push_for_unknown_request_is_drained_and_the_pair_keeps_working(
    cluster: Cluster, receiver: str, tokens: int
) -> None:
    start = cluster.status(1)
    first, ghost, after = (f"{receiver}-{name}" for name in ("first", "ghost", "after"))
    cluster.transfer(1, 1, receiver, first, tokens)  # the pair exists before the ghost push
    cluster.wait([first])
    pair_threads = cluster.status(1)["pair_threads"]

    cluster.send(1, 1, receiver, ghost, tokens)  # nothing reserved: aborted or never known
    cluster.transfer(1, 1, receiver, after, tokens)  # queued behind it on the same pair
    outcomes = cluster.wait([ghost, after])

    assert "unknown request" in outcomes[ghost].sent_error
    assert "unknown request" in outcomes[ghost].done_error
    assert outcomes[ghost].received is None
    assert_intact({after: outcomes[after]}, {after: tokens}, receiver)
    end = cluster.status(1)
    assert end["pair_threads"] == pair_threads, "the pair was rebuilt"
    assert end["num_free"] == start["num_free"]


def test_results_queue_is_empty_after_all_tests(cluster: Cluster) -> None:
    with pytest.raises(queue.Empty):
        cluster.poll(timeout=0.5)
