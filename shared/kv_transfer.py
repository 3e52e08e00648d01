"""KV transfer between a prefill worker and a decode worker (decode-first push).

The decode worker reserves pages and publishes a `TransferDescriptor`: its rendezvous address (a
TCPStore it hosts) and its control address (a ZMQ ROUTER socket). Each (prefill, decode) pair
builds its own two-rank `torch.distributed` group on first use (gloo, host memory) under a
fresh `pair_id`; prefill is rank 0, decode rank 1. Control messages travel on ZMQ beside the data,
and the data of one pair moves in the order of its control messages.

Per request: `KVSender.send` sends a `KVPushMsg`, then the latents ckv [L, S, r] and kpe
[L, S, R] on the pair's group, then waits for the `KVAckMsg`. `shared/kv_layout.py` cuts them into
messages under consecutive tags from `push.tag`: whole for a short request, else in pieces of
tokens whose messages are per-layer slices of the sender's tensors (no copy). Given the decode
worker's page table, the pieces follow its runs of consecutive pages, and `KVReceiver` receives
those straight into its `KVCache` (zero copy); other pieces land in two staging buffers it keeps
per pair and are scattered into the pages while the next piece is in flight. It then calls
`on_done(request_id, push, error)`.
A push for an unknown request is still received in full (the pair's order holds) and acknowledged
with an error. Every transfer has one deadline; on expiry or a broken peer the request fails on
both sides and the pair's group is dropped, so the next request rebuilds it.
"""

from __future__ import annotations

import collections
import datetime
import enum
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
import zmq

from shared.kv_cache import KVCache
from shared.kv_layout import check_pieces, direct_views, piece_starts, plan_pieces, send_messages
from shared.messages import KVAckMsg, KVPushMsg, PairHelloMsg, control_decoder, encoder

logger = logging.getLogger(__name__)

# Bytes of KV per pipelined chunk (rounded down to a power-of-two number of tokens). Both ends
# derive the same split from the tensor's layer count, width and dtype.
CHUNK_BYTES = 64 * 2**20
_MAX_TAG = 2**31
# Pieces of one push with receives posted at a time (two of them staged at most): enough to keep
# the peer sending, few enough that a long fragmented push does not post all its messages.
_MAX_AHEAD = 4


class TransferState(enum.Enum):
    RESERVED = "reserved"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferError(RuntimeError):
    pass


def chunk_tokens(num_layers: int, width: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: the largest power of two whose KV fits in `CHUNK_BYTES` (at least 1)."""
    per_token = num_layers * width * dtype.itemsize
    return 1 << max(0, (CHUNK_BYTES // per_token).bit_length() - 1)


def _remaining(deadline: float) -> datetime.timedelta:
    # Past the deadline, still wait a moment through gloo: its timeout closes the pair's
    # connections, so no receive left posted can write into pages freed after the failure.
    return datetime.timedelta(seconds=max(0.001, deadline - time.monotonic()))


def _wait_all(works: list[dist.Work], deadline: float) -> None:
    for work in works:
        work.wait(_remaining(deadline))


def _new_group(store: dist.Store, pair_id: str, rank: int, timeout: float) -> dist.ProcessGroup:
    """The pair's gloo group. Tensors cross it on the host, also between GPU workers.

    Limitation: a GPU prefill worker copies each request's latents to the host, gloo moves them
    over TCP and the decode worker uploads them again. NCCL would move them GPU to GPU, but two
    NCCL ranks cannot share one GPU, which is the one-GPU setup `bench/gpu_check.sh` runs; a
    multi-GPU deployment wants NCCL between distinct GPUs and CUDA IPC on a shared one.
    """
    prefixed = dist.PrefixStore(f"kv/{pair_id}", store)
    return dist.ProcessGroupGloo(prefixed, rank, 2, datetime.timedelta(seconds=timeout))


class _SenderPair:
    """Prefill side of one pair: a DEALER socket and rank 0 of the pair's group."""

    def __init__(self, ctx: zmq.Context, rendezvous: str, control: str, worker_id: str,
                 timeout: float) -> None:  # fmt: skip
        self.pair_id = uuid.uuid4().hex
        self.lock = threading.Lock()
        self._next_tag = 1
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(control)
        self.socket.send(encoder.encode(PairHelloMsg(self.pair_id, worker_id)))
        host, port = rendezvous.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
        self.group = _new_group(store, self.pair_id, 0, timeout)

    def take_tags(self, count: int) -> int:
        """First of `count` consecutive tags (mod 2**31) for one push; call under `lock`."""
        first = self._next_tag
        self._next_tag = (first + count) % _MAX_TAG
        return first

    def close(self) -> None:
        self.socket.close(0)


class KVSender:
    """Sends requests' latents to decode workers; one cached pair per decode worker."""

    def __init__(self, worker_id: str, timeout: float, fault_delay_s: float = 0.0) -> None:
        self.worker_id = worker_id
        self.timeout = timeout
        # Fault tests only: pause between the control message and the data, so a test can kill
        # a peer while the decode side waits inside the transfer.
        self.fault_delay_s = fault_delay_s
        self._ctx = zmq.Context.instance()
        self._pairs: dict[str, _SenderPair] = {}
        self._building: dict[str, threading.Lock] = {}  # one lock per decode worker address
        self._lock = threading.Lock()

    def _pair(self, rendezvous: str, control: str) -> _SenderPair:
        """The cached pair to `control`, built on first use. Building waits for the peer, so it
        holds only that address's lock: a dead decode worker does not stall sends to others."""
        with self._lock:
            building = self._building.setdefault(control, threading.Lock())
        with building:
            with self._lock:
                pair = self._pairs.get(control)
            if pair is None:
                pair = _SenderPair(self._ctx, rendezvous, control, self.worker_id, self.timeout)
                with self._lock:
                    self._pairs[control] = pair
                logger.info("KV pair %s to %s ready", pair.pair_id, control)
            return pair

    def _drop(self, control: str, pair: _SenderPair) -> None:
        with self._lock:
            if self._pairs.get(control) is pair:
                del self._pairs[control]
        pair.close()

    def send(
        self,
        rendezvous: str,
        control: str,
        push: KVPushMsg,
        ckv: torch.Tensor,
        kpe: torch.Tensor,
        pages: list[int] | None = None,
        page_size: int = 0,
    ) -> None:
        """Blocks until the decode side acknowledged; raises TransferError on failure or deadline.

        `ckv` [layers, push.num_tokens, r] and `kpe` [layers, push.num_tokens, R] are in the
        receiver's dtype, on any device (gloo sends from host memory). `pages` and `page_size`:
        the decode worker's page table for the request (its `TransferDescriptor`); with them,
        runs of consecutive pages are received without a copy. Pushes to one decode worker are
        serialised; the deadline (`timeout`) covers the data and the acknowledgement.
        """
        assert ckv.shape[:2] == kpe.shape[:2] == (ckv.shape[0], push.num_tokens), ckv.shape
        try:
            pair = self._pair(rendezvous, control)
        except Exception as exc:
            raise TransferError(f"cannot reach decode worker at {control}: {exc}") from exc
        chunk = chunk_tokens(ckv.shape[0], ckv.shape[2] + kpe.shape[2], ckv.dtype)
        push.pieces = plan_pieces(push.num_tokens, chunk, pages, page_size)
        pieces = send_messages(ckv.cpu(), kpe.cpu(), push.pieces)
        with pair.lock:
            deadline = time.monotonic() + self.timeout
            push.pair_id, push.tag = pair.pair_id, pair.take_tags(len(pieces))
            try:
                pair.socket.send(encoder.encode(push))
                if self.fault_delay_s:
                    time.sleep(self.fault_delay_s)
                works = [pair.group.send([piece], 1, (push.tag + i) % _MAX_TAG)
                         for i, piece in enumerate(pieces)]  # fmt: skip
                _wait_all(works, deadline)
                ack = self._await_ack(pair, push.request_id, deadline)
            except Exception as exc:
                self._drop(control, pair)
                raise TransferError(f"KV transfer of {push.request_id} failed: {exc}") from exc
        if ack.error:
            raise TransferError(ack.error)

    def _await_ack(self, pair: _SenderPair, request_id: str, deadline: float) -> KVAckMsg:
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not pair.socket.poll(left_ms):
            raise TimeoutError(f"no acknowledgement within {self.timeout}s")
        ack = control_decoder.decode(pair.socket.recv())
        assert isinstance(ack, KVAckMsg) and ack.request_id == request_id, ack
        return ack


class _ReceiverPair:
    """Decode side of one pair: its inbox of pushes, its group and reusable staging buffers."""

    def __init__(self, pair_id: str) -> None:
        self.pair_id = pair_id
        self.inbox: queue.Queue = queue.Queue()
        self.group: dist.ProcessGroup | None = None
        self._staging: list[torch.Tensor | None] = [None] * 4  # ckv and kpe of two pieces

    def staging(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape` view of staging buffer `index`, grown when too small.

        Limitation: a pair keeps staging for two pieces of up to one chunk each (about 2 x 37 MB
        for Kimi-K2.5's layout) for its lifetime, so memory grows with the number of prefill
        peers; a pair whose pushes all land directly allocates none.
        """
        numel = 1
        for size in shape:
            numel *= size
        buf = self._staging[index]
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._staging[index] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


class _PageWriter:
    """Where one push's pieces land in the request's pages; keeps the first failure."""

    def __init__(self, cache: KVCache, pages: list[int] | None):
        self._cache, self.pages = cache, pages
        self.error = ""

    def direct(self, start: int, end: int) -> list[torch.Tensor] | None:
        """The cache views that receive piece [start, end), or None: stage it."""
        return None if self.error else direct_views(self._cache, self.pages, start, end)

    def write(self, start: int, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        """ckv [L, T, r] and kpe [L, T, R] hold tokens [start, start + T) (staged)."""
        if self.pages is None or self.error:
            return  # unknown request, or an earlier write failed: the data is drained
        size = self._cache.page_size
        try:
            if start % size:
                raise ValueError(f"piece at token {start} starts inside a page")
            pages = self.pages[start // size : start // size + -(-ckv.shape[1] // size)]
            self._cache.scatter(pages, ckv, kpe)
        except Exception as exc:  # a bad page table fails the request, not the pair
            logger.exception("writing KV pages failed")
            self.error = f"writing KV pages failed: {exc}"


class KVReceiver:
    """Decode side: hosts the rendezvous store and the control socket, receives into pages.

    `resolve(request_id)` returns the request's page ids, or None when the request is unknown
    (aborted); it is called once per push, before the data arrives, and the pages it returns must
    stay owned by the request until `on_done`: pieces on consecutive pages are received straight
    into them, others are staged and written with `cache.scatter`. `on_done(request_id, push,
    error)` is called once per push, after its acknowledgement went out; `error` is empty on
    success. On a failed transfer the request's pages may hold part of the data.
    """

    def __init__(
        self,
        host: str,
        cache: KVCache,
        resolve: Callable[[str], list[int] | None],
        on_done: Callable[[str, KVPushMsg, str], None],
        timeout: float,
    ) -> None:
        self.timeout = timeout
        self._cache, self._resolve, self._on_done = cache, resolve, on_done
        # Tokens received straight into the cache and through staging, all pushes so far.
        self.num_tokens_by_path = {"direct": 0, "staged": 0}
        self._count_lock = threading.Lock()
        # TCPStore alone listens on every interface; hand it a socket bound to `host` instead.
        self._listener = socket.create_server((host, 0), backlog=128)
        self._store = dist.TCPStore(host, self._listener.getsockname()[1], is_master=True,
                                    wait_for_workers=False, master_listen_fd=self._listener.fileno(),
                                    timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
        self.rendezvous_address = f"{host}:{self._store.port}"
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.control_address = f"tcp://{host}:{port}"
        # Pair threads hand acks to the control thread through an inproc PUSH/PULL pipe, which
        # wakes its poller at once (ZMQ sockets must stay on the thread that uses them).
        self._outbox_address = f"inproc://kv-acks-{uuid.uuid4().hex}"
        self._outbox = zmq.Context.instance().socket(zmq.PULL)
        self._outbox.bind(self._outbox_address)
        self._ack_sockets = threading.local()
        self._pairs: dict[str, _ReceiverPair] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._control_loop, name="kv-control", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _control_loop(self) -> None:
        """Owns the ROUTER socket: routes incoming messages to pair threads, sends acks."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self._outbox in ready:
                self._socket.send_multipart(self._outbox.recv_multipart())
            if self._socket not in ready:
                continue
            identity, payload = self._socket.recv_multipart()
            msg = control_decoder.decode(payload)
            if isinstance(msg, PairHelloMsg):
                pair = _ReceiverPair(msg.pair_id)
                self._pairs[msg.pair_id] = pair
                threading.Thread(target=self._pair_loop, args=(pair,), daemon=True,
                                 name=f"kv-pair-{msg.pair_id[:8]}").start()  # fmt: skip
            elif isinstance(msg, KVPushMsg) and msg.pair_id in self._pairs:
                self._pairs[msg.pair_id].inbox.put((identity, msg))
            else:
                logger.warning("dropping control message %r", msg)

    def _pair_loop(self, pair: _ReceiverPair) -> None:
        try:
            pair.group = _new_group(self._store, pair.pair_id, 1, self.timeout)
        except Exception:
            logger.exception("KV pair %s could not be built", pair.pair_id)
            self._pairs.pop(pair.pair_id, None)
            return
        logger.info("KV pair %s ready", pair.pair_id)
        while not self._stop.is_set():
            try:
                identity, push = pair.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            error, broken = self._receive(pair, push)
            self._send_ack(identity, KVAckMsg(push.request_id, error))
            if broken:  # the peer rebuilds a fresh pair
                self._pairs.pop(pair.pair_id, None)
                pair.group = None  # closes its connections before `on_done` frees the pages
            self._on_done(push.request_id, push, error)
            if broken:
                return

    def _send_ack(self, identity: bytes, ack: KVAckMsg) -> None:
        sock = getattr(self._ack_sockets, "socket", None)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.connect(self._outbox_address)
            self._ack_sockets.socket = sock
        sock.send_multipart([identity, encoder.encode(ack)])

    def _receive(self, pair: _ReceiverPair, push: KVPushMsg) -> tuple[str, bool]:
        """Receives one push into its pages; returns (error, whether the pair is broken)."""
        deadline = time.monotonic() + self.timeout
        pages = self._resolve(push.request_id)
        writer = _PageWriter(self._cache, pages)
        try:
            check_pieces(push.pieces, push.num_tokens)
            if push.pieces:
                self._receive_pieces(pair, push, writer, deadline)
            else:
                self._receive_whole(pair, push, writer, deadline)
        except Exception as exc:  # the group failed or the deadline passed: the pair is unusable
            return f"KV transfer of {push.request_id} failed: {exc}", True
        if pages is None:
            return f"unknown request {push.request_id} (aborted)", False
        return writer.error, False

    def _count(self, path: str, num_tokens: int) -> None:
        with self._count_lock:
            self.num_tokens_by_path[path] += num_tokens

    def _recv(self, pair: _ReceiverPair, buf: torch.Tensor, tag: int) -> dist.Work:
        return pair.group.recv([buf], 0, tag % _MAX_TAG)

    def _staging(self, pair: _ReceiverPair, slot: int, num_tokens: int):
        """Staging ckv [L, T, r] and kpe [L, T, R] for one piece; `slot` 0 or 1."""
        ckv, kpe = self._cache.ckv, self._cache.kpe
        return tuple(pair.staging(2 * slot + i, (t.shape[0], num_tokens, t.shape[-1]), t.dtype)
                     for i, t in enumerate((ckv, kpe)))  # fmt: skip

    def _receive_whole(self, pair, push, writer: _PageWriter, deadline: float) -> None:
        ckv, kpe = self._staging(pair, 0, push.num_tokens)
        _wait_all([self._recv(pair, ckv, push.tag), self._recv(pair, kpe, push.tag + 1)], deadline)
        self._count("staged", push.num_tokens)
        writer.write(0, ckv, kpe)

    def _receive_pieces(self, pair, push, writer: _PageWriter, deadline: float) -> None:
        """Pieces land in the cache, or in one of two staging slots and are written from there
        while the next ones arrive. Receives are posted `_MAX_AHEAD` pieces ahead, so the sender
        seldom waits for a receive to be posted."""
        pieces, layers = piece_starts(push.pieces), self._cache.ckv.shape[0]
        pending: collections.deque = collections.deque()  # (works, piece, staging or None)
        posted = num_staged = 0
        while posted < len(pieces) or pending:
            while posted < len(pieces) and len(pending) < _MAX_AHEAD:
                start, end = pieces[posted]
                staged, views = None, writer.direct(start, end)
                if views is None:
                    if sum(entry[2] is not None for entry in pending) == 2:
                        break  # both slots are in flight
                    staged = self._staging(pair, num_staged % 2, end - start)
                    views = [t[layer] for layer in range(layers) for t in staged]
                    num_staged += 1
                tag = push.tag + 2 * layers * posted
                works = [self._recv(pair, view, tag + i) for i, view in enumerate(views)]
                pending.append((works, (start, end), staged))
                posted += 1
            works, (start, end), staged = pending.popleft()
            _wait_all(works, deadline)
            self._count("direct" if staged is None else "staged", end - start)
            if staged is not None:
                writer.write(start, *staged)
