"""The decode engine: continuous batching over the paged latent cache.

Request life on a decode worker: `reserve` (pages for the prompt, state RESERVED) ->
KV arrives through the receiver (`on_transfer_done`) -> admitted to the running batch with the
first token the prefill worker sampled -> one token per step until a stop condition -> pages
freed. Pages are freed exactly once on every path: finish, abort, failed transfer. When the pool
runs dry mid-generation, the newest running requests are swapped out to host memory and come
back later (`decode_worker/swap.py`); a swapped request holds no pages.

Threads: gRPC handlers call `reserve`, `abort` and read `Request.outputs`; the KV receiver calls
`on_transfer_done`; only the engine loop touches `running` and runs the model. The loop is
`run_once` repeated; an in-process driver (`decode_worker/colocated.py`) may call `run_once`
itself instead of starting the thread.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from decode_worker.swap import SwapSpace, default_swap_bytes
from shared.kv_cache import OutOfPagesError, pages_needed
from shared.kv_transfer import TransferState
from shared.messages import KVPushMsg
from shared.runner import ModelRunner, SeqStep
from shared.sampling import Sampled, SamplingConfig, sample_batch

if TYPE_CHECKING:
    from shared.grammar import GrammarState

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DecodeOutput:
    """One event on a request's output queue: a token, or the end (finish_reason set)."""

    sampled: Sampled | None = None
    finish_reason: str = ""
    error: str = ""


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_tokens: int
    stop_token_ids: frozenset[int]
    page_table: list[int]
    state: TransferState = TransferState.RESERVED
    output_ids: list[int] = dataclasses.field(default_factory=list)
    outputs: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    aborted: bool = False
    reserved_at: float = dataclasses.field(default_factory=time.monotonic)
    grammar: GrammarState | None = None  # `response_format`: advanced by every emitted token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class DecodeEngine:
    def __init__(
        self,
        runner: ModelRunner,
        max_running: int = 256,
        transfer_timeout: float = 30.0,
        swap_space_bytes: int = -1,  # -1: `default_swap_bytes`; 0: a dry pool fails requests
        resume_margin_tokens: int = 64,
    ) -> None:
        self.runner = runner
        self.max_running = max_running
        self.transfer_timeout = transfer_timeout
        if swap_space_bytes < 0:
            swap_space_bytes = default_swap_bytes(runner)
        self.swap = SwapSpace(runner, swap_space_bytes, resume_margin_tokens)
        # Expert parallelism: all-reduces this rank's running count over the worker's ranks.
        self.lockstep: Callable[[int], int] | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self._next_expiry_check = 0.0
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._admit: queue.Queue[tuple[Request, Sampled]] = queue.Queue()
        self._wakeup = threading.Event()
        self.running: list[Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()

    # ------------------------------------------------------------ called from other threads

    def reserve(self, request: Request) -> list[int]:
        """Reserves pages for the prompt; raises OutOfPagesError when the cache is full, or
        when the reservation would take pages that swapped-out requests wait for."""
        num = pages_needed(len(request.prompt_ids), self.runner.page_size)
        wanted = self.swap.pages_wanted
        if wanted and self.runner.allocator.num_free - num < wanted:
            raise OutOfPagesError(f"{self.swap.num_swapped} swapped-out requests wait for pages")
        request.page_table = self.runner.allocator.allocate(num)
        with self._lock:
            self._requests[request.request_id] = request
        return request.page_table

    def pages_of(self, request_id: str) -> list[int] | None:
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.aborted:
                return None
            request.state = TransferState.TRANSFERRING
            return request.page_table

    def on_transfer_done(self, request_id: str, push: KVPushMsg, error: str) -> None:
        first = Sampled(push.first_token, push.first_logprob, list(push.first_top_logprobs))
        self.on_kv_ready(request_id, first, error)

    def on_kv_ready(self, request_id: str, first: Sampled | None, error: str = "") -> None:
        """The prompt's latents are in the request's pages (or `error` says why not): the
        request joins the running batch at the next step, starting with `first`."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is None:
            return
        if error or request.aborted:
            request.state = TransferState.FAILED
            self._finish(request, "abort" if request.aborted else "error", error)
            return
        assert first is not None, "a successful prefill brings its first token"
        request.state = TransferState.DONE
        self._admit.put((request, first))
        self._wakeup.set()

    def abort(self, request_id: str) -> bool:
        """Marks the request aborted; its pages are freed by whoever holds it next.

        A request still waiting for its KV is finished here, atomically with respect to the KV
        receiver (`pages_of`), so its pages are never freed while data is written into them.
        """
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return False
            request.aborted = True
            waiting_for_kv = request.state == TransferState.RESERVED
            if waiting_for_kv:
                del self._requests[request_id]
        if waiting_for_kv:
            self._release(request, "abort", "aborted")
        self._wakeup.set()
        return True

    def num_free_pages(self) -> int:
        return self.runner.allocator.num_free

    def has_admissions(self) -> bool:
        """Requests whose KV is in place (or on the host, swapped out) but that are not in the
        running batch."""
        return not self._admit.empty() or self.swap.num_swapped > 0

    # ------------------------------------------------------------ engine loop

    def _finish(self, request: Request, reason: str, error: str = "") -> None:
        with self._lock:
            if self._requests.pop(request.request_id, None) is None:
                return  # already finished: pages were freed then
        self._release(request, reason, error)

    def _release(self, request: Request, reason: str, error: str) -> None:
        """Frees the pages of a request already removed from `_requests` (exactly once)."""
        self.runner.allocator.free(request.page_table)
        request.outputs.put(DecodeOutput(finish_reason=reason, error=error))

    def _emit(self, request: Request, sampled: Sampled) -> bool:
        """Appends a token; returns True while the request keeps running."""
        if request.grammar is not None and not request.grammar.accept(sampled.token_id):
            # Only a first token sampled without the grammar gets here (a prefill that ignored
            # it): the output could no longer follow the format, so it ends rather than lie.
            self._finish(request, "error", f"token {sampled.token_id} breaks the request's "
                         "response_format")  # fmt: skip
            return False
        request.output_ids.append(sampled.token_id)
        request.outputs.put(DecodeOutput(sampled=sampled))
        if sampled.token_id in request.stop_token_ids:
            self._finish(request, "stop")
        elif len(request.output_ids) >= request.max_tokens:
            self._finish(request, "length")
        else:
            return True
        return False

    def _admit_new(self) -> None:
        while len(self.running) < self.max_running and not self._admit.empty():
            request, first = self._admit.get_nowait()
            if request.aborted:
                self._finish(request, "abort", "aborted")
            elif self._emit(request, first):
                self.running.append(request)

    def _expire_reservations(self) -> None:
        """Frees reservations whose KV never started arriving (the prefill side is gone)."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 0.5
        with self._lock:
            expired = [
                r for r in self._requests.values()
                if r.state == TransferState.RESERVED and now - r.reserved_at > self.transfer_timeout
            ]  # fmt: skip
            for request in expired:
                del self._requests[request.request_id]
        for request in expired:
            logger.warning("request %s: no KV within %.1fs; freeing its pages", request.request_id,
                           self.transfer_timeout)  # fmt: skip
            self._release(request, "error", "KV transfer deadline passed before any data arrived")

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.run_once():
                self._wakeup.wait(0.05)
                self._wakeup.clear()

    def run_once(self) -> bool:
        """Expires stale reservations, admits arrived requests, drops aborted ones and runs one
        step; returns False when there was nothing to run."""
        self._expire_reservations()
        self._swap_in()
        self._admit_new()
        for request in [r for r in self.running if r.aborted]:
            self.running.remove(request)
            self._finish(request, "abort", "aborted")
        if self.lockstep is not None:
            return self._run_lockstep()
        if not self.running:
            return False
        try:
            self.step()
        except Exception as exc:  # a failed step fails its requests, not the worker
            logger.exception("decode step failed")
            for request in self.running:
                self._finish(request, "error", f"decode step failed: {exc}")
            self.running = []
        return True

    def _run_lockstep(self) -> bool:
        """Expert parallelism: every rank steps together; a rank without requests runs an empty
        step so the MoE collectives meet. A failed collective means a rank is gone: this rank's
        requests end with an error and the process exits rather than hang."""
        try:
            if self.lockstep(len(self.running)) == 0:
                return False
            self.step(idle_ok=True)
        except Exception as exc:
            logger.error("expert-parallel step failed (%s); this worker stops", exc)
            for request in self.running + self.swap.drop(lambda r: True):
                self._finish(request, "error", f"expert-parallel worker lost a rank: {exc}")
            self.running = []
            self.on_fatal()
        return True

    def step(self, idle_ok: bool = False) -> None:
        """One decode step for every running request: feed the last token, sample the next."""
        batch = self.running = self._make_room()
        steps = [SeqStep([r.output_ids[-1]], r.num_tokens - 1, r.page_table) for r in batch]
        if not batch:
            if idle_ok:
                self.runner.run([])  # an idle rank's step: the collectives need every rank
            return
        logits = self.runner.run(steps)  # [B, V]
        sampled = sample_batch(
            logits,
            [r.sampling for r in batch],
            [len(r.output_ids) for r in batch],
            [r.prompt_ids for r in batch],
            [r.output_ids for r in batch],
            [r.grammar for r in batch],
        )
        self.running = [r for r, s in zip(batch, sampled) if self._emit(r, s)]

    # ------------------------------------------------------------ preemption (engine thread)

    def _swap_in(self) -> None:
        """Drops swapped requests that were aborted or ended elsewhere (freeing their host
        copies), then resumes swapped ones, oldest first, before new arrivals are admitted."""
        with self._lock:
            gone = self.swap.drop(lambda r: r.aborted or r.request_id not in self._requests)
        for request in gone:
            self._finish(request, "abort", "aborted")  # no-op for one already finished
        room = self.max_running - len(self.running)
        self.running.extend(self.swap.swap_in(room))

    def _make_room(self) -> list[Request]:
        """Grows running requests' pages for this step, oldest arrival first; when the pool runs
        dry, the newest ones are swapped out. Returns the requests that step now."""
        pending = sorted(self.running, key=lambda r: r.reserved_at)
        batch = []
        while pending:
            request = pending.pop(0)
            if self._never_fits(request):
                continue
            grown = self._grow(request)
            while not grown and pending:
                self._preempt(pending.pop())
                grown = self._grow(request)
            if grown:
                batch.append(request)
            else:
                self._preempt(request)
        return batch

    def _grow(self, request: Request) -> bool:
        try:
            self.runner.ensure_pages(request.page_table, request.num_tokens)
            return True
        except OutOfPagesError:
            return False

    def _never_fits(self, request: Request) -> bool:
        """Ends a request whose tokens need more pages than the whole pool."""
        need = pages_needed(request.num_tokens, self.runner.page_size)
        total = self.runner.allocator.num_pages
        if need <= total:
            return False
        self._finish(request, "error", f"decode worker is out of KV memory: {request.num_tokens} "
                     f"tokens need {need} pages and the worker holds {total}")  # fmt: skip
        return True

    def _preempt(self, request: Request) -> None:
        error = self.swap.swap_out(request)
        if error:
            logger.warning("request %s ends: %s", request.request_id, error)
            self._finish(request, "error", error)
