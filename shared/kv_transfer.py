"""KV transfer between a prefill worker and a decode worker (decode-first push).

The decode worker reserves pages and publishes a `TransferDescriptor`: its rendezvous address (a
TCPStore it hosts) and its control address (a ZMQ ROUTER socket). Each (prefill, decode) pair
builds its own two-rank `torch.distributed` group on first use (gloo on CPU, NCCL on GPU) under a
fresh `pair_id`; prefill is rank 0, decode rank 1. Control messages travel on ZMQ beside the data,
and the data of one pair moves in the order of its control messages.

Per request: `KVSender.send` sends a `KVPushMsg`, then the latents [L, S, r+R] as one tensor on
the pair's group, then waits for the `KVAckMsg`. `KVReceiver` receives into a buffer, scatters it
into the reserved pages and calls `on_done(request_id, push)`. Every transfer has a deadline; on
expiry or a broken peer the request fails on both sides and the pair's group is dropped, so the
next request rebuilds it.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
import zmq

from shared.messages import KVAckMsg, KVPushMsg, PairHelloMsg, control_decoder, encoder

logger = logging.getLogger(__name__)


class TransferState(enum.Enum):
    RESERVED = "reserved"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferError(RuntimeError):
    pass


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
        self.tags = itertools.count(1)
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(control)
        self.socket.send(encoder.encode(PairHelloMsg(self.pair_id, worker_id)))
        host, port = rendezvous.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
        self.group = _new_group(store, self.pair_id, 0, timeout)

    def close(self) -> None:
        self.socket.close(0)


class KVSender:
    """Sends requests' latents to decode workers; one cached pair per decode worker."""

    def __init__(self, worker_id: str, timeout: float) -> None:
        self.worker_id = worker_id
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._pairs: dict[str, _SenderPair] = {}
        self._lock = threading.Lock()

    def _pair(self, rendezvous: str, control: str) -> _SenderPair:
        with self._lock:
            pair = self._pairs.get(control)
            if pair is None:
                pair = _SenderPair(self._ctx, rendezvous, control, self.worker_id, self.timeout)
                self._pairs[control] = pair
                logger.info("KV pair %s to %s ready", pair.pair_id, control)
            return pair

    def _drop(self, control: str, pair: _SenderPair) -> None:
        with self._lock:
            if self._pairs.get(control) is pair:
                del self._pairs[control]
        pair.close()

    def send(self, rendezvous: str, control: str, push: KVPushMsg, kv: torch.Tensor) -> None:
        """Blocks until the decode side acknowledged; raises TransferError on failure or deadline."""
        try:
            pair = self._pair(rendezvous, control)
        except Exception as exc:
            raise TransferError(f"cannot reach decode worker at {control}: {exc}") from exc
        with pair.lock:
            push.pair_id, push.tag = pair.pair_id, next(pair.tags) % (2**31)
            try:
                pair.socket.send(encoder.encode(push))
                pair.group.send([kv.contiguous()], 1, push.tag).wait(
                    datetime.timedelta(seconds=self.timeout)
                )
                ack = self._await_ack(pair, push.request_id)
            except Exception as exc:
                self._drop(control, pair)
                raise TransferError(f"KV transfer of {push.request_id} failed: {exc}") from exc
        if ack.error:
            raise TransferError(ack.error)

    def _await_ack(self, pair: _SenderPair, request_id: str) -> KVAckMsg:
        if not pair.socket.poll(int(self.timeout * 1000)):
            raise TimeoutError(f"no acknowledgement within {self.timeout}s")
        ack = control_decoder.decode(pair.socket.recv())
        assert isinstance(ack, KVAckMsg) and ack.request_id == request_id, ack
        return ack


class _ReceiverPair:
    def __init__(self, pair_id: str) -> None:
        self.pair_id = pair_id
        self.inbox: queue.Queue = queue.Queue()
        self.group: dist.ProcessGroup | None = None


class KVReceiver:
    """Decode side: hosts the rendezvous store and the control socket, receives into pages.

    `resolve(request_id)` returns the request's page ids, or None when the request is unknown
    (aborted); `on_done(request_id, push, ok, error)` is called once per push.
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
    ) -> None:
        self.timeout = timeout
        self._write_pages, self._resolve, self._on_done = write_pages, resolve, on_done
        self._kv_shape, self._dtype = kv_shape, dtype
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
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
            error = self._receive(pair, push)
            self._send_ack(identity, KVAckMsg(push.request_id, error))
            if error and "unknown request" not in error:
                self._pairs.pop(pair.pair_id, None)  # the peer rebuilds a fresh pair
                self._on_done(push.request_id, push, error)
                return
            self._on_done(push.request_id, push, error)

    def _send_ack(self, identity: bytes, ack: KVAckMsg) -> None:
        sock = getattr(self._ack_sockets, "socket", None)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.connect(self._outbox_address)
            self._ack_sockets.socket = sock
        sock.send_multipart([identity, encoder.encode(ack)])

    def _receive(self, pair: _ReceiverPair, push: KVPushMsg) -> str:
        layers, width = self._kv_shape
        buf = torch.empty(layers, push.num_tokens, width, dtype=self._dtype)
        try:
            pair.group.recv([buf], 0, push.tag).wait(datetime.timedelta(seconds=self.timeout))
        except Exception as exc:
            return f"KV transfer of {push.request_id} failed: {exc}"
        pages = self._resolve(push.request_id)
        if pages is None:
            return f"unknown request {push.request_id} (aborted)"
        self._write_pages(pages, buf)
        return ""
