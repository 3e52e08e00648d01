"""The vision worker's embedding cache: image embeddings by content hash, bounded in bytes.

Entries leave least recently used first once the total passes `max_bytes`. An entry pinned by a
request (from its Encode until its Release, or until `pin_timeout` passes) is never evicted, so
the prefill worker can always fetch what the router was promised; pinned entries may hold the
cache above its bound until they are released. Thread-safe: gRPC handler threads and the engine
loop share one instance.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class _Entry:
    embeds: torch.Tensor  # [N, E]
    num_bytes: int
    num_pins: int = 0


@dataclasses.dataclass
class _Pin:
    deadline: float
    keys: list[str]  # one item per pin, so an image pinned twice is released twice


@dataclasses.dataclass(frozen=True)
class CacheStats:
    num_bytes: int
    num_entries: int
    num_pinned: int
    num_hits: int
    num_misses: int


class EmbeddingCache:
    """`pin` answers from the cache (a hit); `put` stores what the encoder made (a miss)."""

    def __init__(self, max_bytes: int, pin_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_bytes = max_bytes
        self.pin_timeout = pin_timeout
        self._clock = clock
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._pins: dict[str, _Pin] = {}
        self._num_bytes = 0
        self._num_hits = 0
        self._num_misses = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        """The embeddings [N, E] under `key`, or None when they are not (or no longer) here."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.embeds

    def pin(self, key: str, request_id: str) -> torch.Tensor | None:
        """The embeddings under `key`, pinned for `request_id` (a hit), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._num_hits += 1
            self._entries.move_to_end(key)
            self._add_pin(key, entry, request_id)
            return entry.embeds

    def put(self, key: str, embeds: torch.Tensor, request_id: str) -> None:
        """Stores freshly encoded embeddings (a miss), pinned for `request_id`."""
        with self._lock:
            self._num_misses += 1
            if key in self._entries:  # two workers' worth of racing is harmless: keep the first
                entry = self._entries[key]
            else:
                entry = _Entry(embeds, embeds.numel() * embeds.element_size())
                self._entries[key] = entry
                self._num_bytes += entry.num_bytes
            self._add_pin(key, entry, request_id)
            self._evict()

    def release(self, request_id: str) -> int:
        """Drops the pins of `request_id`; returns how many there were."""
        with self._lock:
            pin = self._pins.pop(request_id, None)
            if pin is None:
                return 0
            self._unpin(pin)
            self._evict()
            return len(pin.keys)

    def stats(self) -> CacheStats:
        with self._lock:
            self._expire_pins()
            self._evict()
            num_pinned = sum(1 for e in self._entries.values() if e.num_pins)
            return CacheStats(self._num_bytes, len(self._entries), num_pinned, self._num_hits,
                              self._num_misses)  # fmt: skip

    # ------------------------------------------------------------ under the lock

    def _add_pin(self, key: str, entry: _Entry, request_id: str) -> None:
        self._expire_pins()
        deadline = self._clock() + self.pin_timeout
        pin = self._pins.setdefault(request_id, _Pin(deadline, []))
        pin.deadline = deadline
        pin.keys.append(key)
        entry.num_pins += 1

    def _unpin(self, pin: _Pin) -> None:
        for key in pin.keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.num_pins -= 1

    def _expire_pins(self) -> None:
        now = self._clock()
        for request_id in [r for r, p in self._pins.items() if p.deadline <= now]:
            self._unpin(self._pins.pop(request_id))

    def _evict(self) -> None:
        if self._num_bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if not e.num_pins]:  # oldest first
            self._num_bytes -= self._entries.pop(key).num_bytes
            if self._num_bytes <= self.max_bytes:
                return
