"""Preemption by swapping: the decode engine's answer to a page pool that runs dry.

A decode worker reserves pages for a prompt only and takes one more page every `page_size`
tokens, so running requests can outgrow the pool. When a step cannot get a page, the engine
preempts the most recently arrived running requests: `SwapSpace.swap_out` copies a request's
cached latents into host memory (pinned when the cache is on a GPU), frees its pages and parks
it. The request keeps everything else (tokens, sampling and grammar state, output queue) and
stays known to the engine, so aborts and deadlines still reach it. Each engine step first brings
parked requests back (`swap_in`), oldest arrival first, into new pages.

Swapping, not recomputation: a decode worker has no image embeddings (they stayed on the prefill
side), and a recomputed prefill would have to repeat on every expert-parallel rank in lockstep.

Host memory is bounded (`max_bytes`); a request that would not fit there ends with an error
instead. Only the engine thread calls these methods; `pages_wanted` is read by other threads
(the reservation back-pressure), which is safe for a plain int.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from shared.kv_cache import OutOfPagesError, pages_needed
from shared.runner import ModelRunner

if TYPE_CHECKING:  # the engine imports this module
    from decode_worker.engine import Request

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SwappedRequest:
    request: Request
    ckv: torch.Tensor  # [L, S, r] on the host; S = tokens whose latents were cached
    kpe: torch.Tensor  # [L, S, R]

    @property
    def nbytes(self) -> int:
        return self.ckv.nbytes + self.kpe.nbytes


def default_swap_bytes(runner: ModelRunner) -> int:
    """As many bytes as the page pool: room for a running set replaced once over (4 streams
    of 3,000 tokens on a pool of 8,192 tokens park 4,778 tokens at most). On a GPU this is host
    memory, not GPU memory."""
    return runner.cache.ckv.nbytes + runner.cache.kpe.nbytes


class SwapSpace:
    """Host copies of preempted requests' latents, ordered by arrival, at most `max_bytes`.

    `resume_margin_tokens`: a parked request comes back only when the pool has pages for its
    next that many tokens too (capped at the whole pool), so it does not get swapped out again
    at once. Resumption is strictly in order: a large request at the head is not overtaken.
    """

    def __init__(self, runner: ModelRunner, max_bytes: int, resume_margin_tokens: int) -> None:
        self.runner = runner
        self.max_bytes = max_bytes
        self.resume_margin_tokens = resume_margin_tokens
        self.used_bytes = 0
        self.num_preemptions = 0  # since the worker started
        self.pages_wanted = 0  # what the head of the queue waits for; 0 when none is parked
        self._parked: list[SwappedRequest] = []  # oldest arrival first

    @property
    def num_swapped(self) -> int:
        return len(self._parked)

    def swapped_ids(self) -> list[str]:
        return [entry.request.request_id for entry in self._parked]

    def swap_out(self, request: Request) -> str:
        """Moves the request's cached latents to the host and frees its pages; returns "" or,
        when the swap space cannot hold them, why (the request keeps its pages then)."""
        num_cached = request.num_tokens - 1  # the last token is fed at the next step
        nbytes = num_cached * self.runner.cache.bytes_per_token()
        if self.used_bytes + nbytes > self.max_bytes:
            return (
                f"decode worker is out of KV memory: no free pages, and swapping out "
                f"{num_cached} tokens ({nbytes} bytes) would exceed the swap space "
                f"({self.used_bytes} of {self.max_bytes} bytes in use)"
            )
        ckv, kpe = self.runner.cache.gather(request.page_table, num_cached)
        entry = SwappedRequest(request, _to_host(ckv), _to_host(kpe))
        self.runner.allocator.free(request.page_table)
        request.page_table = []
        bisect.insort(self._parked, entry, key=lambda e: e.request.reserved_at)
        self.used_bytes += entry.nbytes
        self.num_preemptions += 1
        self._update_wanted()
        logger.debug("request %s swapped out (%d tokens, %d bytes)", request.request_id,
                     num_cached, entry.nbytes)  # fmt: skip
        return ""

    def swap_in(self, room: int) -> list[Request]:
        """Brings back up to `room` parked requests, in order, while the pool has pages for each
        (with the margin); returns them with their latents in new pages."""
        resumed = []
        while self._parked and len(resumed) < room:
            entry = self._parked[0]
            if self.runner.allocator.num_free < self._wanted(entry):
                break
            try:
                pages = self.runner.allocator.allocate(
                    pages_needed(entry.ckv.shape[1], self.runner.page_size)
                )
            except OutOfPagesError:  # a reservation took the pages meanwhile
                break
            device = self.runner.cache.ckv.device
            self.runner.cache.scatter(pages, entry.ckv.to(device, non_blocking=True),
                                      entry.kpe.to(device, non_blocking=True))  # fmt: skip
            entry.request.page_table = pages
            self._remove(entry)
            resumed.append(entry.request)
            logger.debug("request %s swapped in", entry.request.request_id)
        return resumed

    def drop(self, gone: Callable[[Request], bool]) -> list[Request]:
        """Frees the host copies of parked requests for which `gone(request)` holds (aborted,
        or ended elsewhere, e.g. by a deadline); returns those requests."""
        dropped = [e for e in self._parked if gone(e.request)]
        for entry in dropped:
            self._remove(entry)
        return [e.request for e in dropped]

    def _remove(self, entry: SwappedRequest) -> None:
        self._parked.remove(entry)
        self.used_bytes -= entry.nbytes
        self._update_wanted()

    def _wanted(self, entry: SwappedRequest) -> int:
        tokens = entry.request.num_tokens + self.resume_margin_tokens
        return min(pages_needed(tokens, self.runner.page_size), self.runner.allocator.num_pages)

    def _update_wanted(self) -> None:
        self.pages_wanted = self._wanted(self._parked[0]) if self._parked else 0


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A compact host copy; pinned when the source is on a GPU, so the copy back is async."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    host.copy_(tensor)
    return host
