"""KV transfer between a prefill worker and a decode worker (decode-first push).

The decode worker reserves pages and publishes a `TransferDescriptor`: its rendezvous address (a
TCPStore it hosts) and its control address (a ZMQ ROUTER socket). Each (prefill, decode) pair
builds its own two-rank `torch.distributed` group on first use (gloo on CPU, NCCL on GPU) under a
fresh `pair_id`; prefill is rank 0, decode rank 1. Control messages travel on ZMQ beside the data,
and the data of one pair moves in the order of its control messages.

Per request: `KVSender.send` sends a `KVPushMsg`, then the latents [L, S, r+R] on the pair's
group, then waits for the `KVAckMsg`. A request whose KV fits in one chunk (`chunk_tokens`, about
`CHUNK_BYTES`) moves as one tensor; a longer one moves chunk by chunk, one message per layer and
chunk (each a contiguous slice of the sender's tensor, so the sender copies nothing), under
consecutive tags from `push.tag`. `KVReceiver` looks the request's pages up first, receives into
staging buffers it keeps per pair, and writes them into the pages; given `page_size`, it writes
each chunk while the next one is in flight. It then calls `on_done(request_id, push, error)`.
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

from shared.messages import KVAckMsg, KVPushMsg, PairHelloMsg, control_decoder, encoder

logger = logging.getLogger(__name__)

# Bytes of KV per pipelined chunk (rounded down to a power-of-two number of tokens). Both ends
# derive the same split from the tensor's layer count, width and dtype.
CHUNK_BYTES = 64 * 2**20
_MAX_TAG = 2**31


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


def token_ranges(num_tokens: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, num_tokens)) for start in range(0, num_tokens, chunk)]


def _remaining(deadline: float) -> datetime.timedelta:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("transfer deadline passed")
    return datetime.timedelta(seconds=left)


def _wait_all(works: list[dist.Work], deadline: float) -> None:
    for work in works:
        work.wait(_remaining(deadline))


def _new_group(store: dist.Store, pair_id: str, rank: int, timeout: float) -> dist.ProcessGroup:
    prefixed = dist.PrefixStore(f"kv/{pair_id}", store)
    span = datetime.timedelta(seconds=timeout)
    if torch.cuda.is_available():
        return dist.ProcessGroupNCCL(prefixed, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(prefixed, rank, 2, span)


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


def _pieces(kv: torch.Tensor) -> list[torch.Tensor]:
    """The messages of one push, in tag order: [L, S, W] whole, or [S_chunk, W] per chunk, layer."""
    layers, num_tokens, width = kv.shape
    chunk = chunk_tokens(layers, width, kv.dtype)
    if num_tokens <= chunk:
        return [kv]
    ranges = token_ranges(num_tokens, chunk)
    return [kv[layer, start:end] for start, end in ranges for layer in range(layers)]


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

    def send(self, rendezvous: str, control: str, push: KVPushMsg, kv: torch.Tensor) -> None:
        """Blocks until the decode side acknowledged; raises TransferError on failure or deadline.

        `kv` is [layers, push.num_tokens, r+R] in the receiver's dtype. Pushes to one decode
        worker are serialised; the deadline (`timeout`) covers the data and the acknowledgement.
        """
        try:
            pair = self._pair(rendezvous, control)
        except Exception as exc:
            raise TransferError(f"cannot reach decode worker at {control}: {exc}") from exc
        pieces = _pieces(kv.contiguous())
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
    """Decode side of one pair: its inbox of pushes, its group and two reusable staging buffers."""

    def __init__(self, pair_id: str) -> None:
        self.pair_id = pair_id
        self.inbox: queue.Queue = queue.Queue()
        self.group: dist.ProcessGroup | None = None
        self._staging: list[torch.Tensor | None] = [None, None]

    def staging(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape` view of staging buffer `index`, grown when too small.

        Limitation: a pair keeps two buffers of up to one chunk each (about 2 x 37 MB for
        Kimi-K2.5's layout) for its lifetime, so memory grows with the number of prefill peers.
        """
        numel = 1
        for size in shape:
            numel *= size
        buf = self._staging[index]
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._staging[index] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


class _PageWriter:
    """Writes received token ranges into a request's pages; keeps the first failure."""

    def __init__(self, write_pages: Callable, pages: list[int] | None, page_size: int | None):
        self._write_pages, self.pages, self._page_size = write_pages, pages, page_size
        self.error = ""

    def write(self, start: int, kv: torch.Tensor) -> None:
        """kv [L, T, W] holds tokens [start, start + T); `start` is page-aligned."""
        if self.pages is None or self.error:
            return  # unknown request, or an earlier write failed: the data is drained
        pages = self.pages
        if start:
            first = start // self._page_size
            pages = pages[first : first + -(-kv.shape[1] // self._page_size)]
        try:
            self._write_pages(pages, kv)
        except Exception as exc:  # a bad page table fails the request, not the pair
            logger.exception("writing KV pages failed")
            self.error = f"writing KV pages failed: {exc}"


class KVReceiver:
    """Decode side: hosts the rendezvous store and the control socket, receives into pages.

    `resolve(request_id)` returns the request's page ids, or None when the request is unknown
    (aborted); it is called once per push, before the data arrives, and the pages it returns must
    stay owned by the request until `on_done`. `write_pages(pages, kv)` copies kv [L, T, r+R],
    whose token 0 sits at offset 0 of `pages[0]` (kv may be a reused buffer: keep no reference);
    with `page_size` set it is called once per chunk while the next chunk is in flight, else once
    per push. `on_done(request_id, push, error)` is
    called once per push, after its acknowledgement went out; `error` is empty on success.
    """

    def __init__(
        self,
        host: str,
        write_pages: Callable[[list[int], torch.Tensor], None],
        resolve: Callable[[str], list[int] | None],
        on_done: Callable[[str, KVPushMsg, str], None],
        kv_shape: tuple[int, int],  # (layers, r+R)
        dtype: torch.dtype,
        timeout: float,
        page_size: int | None = None,
    ) -> None:
        self.timeout = timeout
        self._write_pages, self._resolve, self._on_done = write_pages, resolve, on_done
        self._kv_shape, self._dtype = kv_shape, dtype
        self._chunk = chunk_tokens(kv_shape[0], kv_shape[1], dtype)
        # Chunks are written as they arrive only when chunk boundaries fall on page boundaries.
        self._page_size = page_size if page_size and self._chunk % page_size == 0 else None
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
            if broken:
                self._pairs.pop(pair.pair_id, None)  # the peer rebuilds a fresh pair
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
        writer = _PageWriter(self._write_pages, pages, self._page_size)
        try:
            if push.num_tokens <= self._chunk:
                self._receive_whole(pair, push, writer, deadline)
            elif self._page_size is not None:
                self._receive_pipelined(pair, push, writer, deadline)
            else:
                self._receive_chunked(pair, push, writer, deadline)
        except Exception as exc:  # the group failed or the deadline passed: the pair is unusable
            return f"KV transfer of {push.request_id} failed: {exc}", True
        if pages is None:
            return f"unknown request {push.request_id} (aborted)", False
        return writer.error, False

    def _recv(self, pair: _ReceiverPair, buf: torch.Tensor, tag: int) -> dist.Work:
        return pair.group.recv([buf], 0, tag % _MAX_TAG)

    def _receive_whole(self, pair, push, writer: _PageWriter, deadline: float) -> None:
        layers, width = self._kv_shape
        buf = pair.staging(0, (layers, push.num_tokens, width), self._dtype)
        _wait_all([self._recv(pair, buf, push.tag)], deadline)
        writer.write(0, buf)

    def _receive_pipelined(self, pair, push, writer: _PageWriter, deadline: float) -> None:
        """Chunk i+1 lands in one staging buffer while chunk i is written from the other.

        Two chunks are always posted ahead, so the sender never waits for a receive to be posted.
        """
        layers, width = self._kv_shape
        ranges = token_ranges(push.num_tokens, self._chunk)

        def post(index: int) -> tuple[list[dist.Work], torch.Tensor]:
            start, end = ranges[index]
            buf = pair.staging(index % 2, (layers, end - start, width), self._dtype)
            tag = push.tag + index * layers
            return [self._recv(pair, buf[layer], tag + layer) for layer in range(layers)], buf

        pending = collections.deque(post(index) for index in range(min(2, len(ranges))))
        for index, (start, _) in enumerate(ranges):
            works, buf = pending.popleft()
            _wait_all(works, deadline)
            writer.write(start, buf)
            if index + 2 < len(ranges):
                pending.append(post(index + 2))

    def _receive_chunked(self, pair, push, writer: _PageWriter, deadline: float) -> None:
        """Without a page size, chunks land in one full-size buffer written once at the end."""
        layers, width = self._kv_shape
        buf = torch.empty(layers, push.num_tokens, width, dtype=self._dtype)
        ranges = token_ranges(push.num_tokens, self._chunk)
        works = [self._recv(pair, buf[layer, start:end], push.tag + index * layers + layer)
                 for index, (start, end) in enumerate(ranges) for layer in range(layers)]  # fmt: skip
        _wait_all(works, deadline)
        writer.write(0, buf)
