"""The prefill engine: batches waiting prompts into ragged forward passes of bounded size.

Each forward (`step`) takes at most `max_prefill_chunk` prompt tokens: first the next chunks of
prompts already started, in arrival order, then new prompts while the budget and the free pages
last. A prompt longer than the budget spans several steps (chunked prefill); its later chunks
attend over the latents its earlier chunks left in the cache. A job gets all its pages when it
starts. When its last chunk has run, its first token is sampled, its latents are copied out as
one tensor [L, S, r+R] for the KV sender, and its pages are freed before its future resolves.
A job that brings its own pages (`PrefillJob.pages`: a colocated worker, whose decode engine
reserved them in this same cache) is computed in place; nothing is copied out or freed.

With a prefix cache (`prefix_cache=True`, `prefill_worker/prefix_cache.py`), a new job starts
after the longest cached page-aligned prefix of its prompt (at least its last token is computed,
for the logits of the first token): those pages are locked while it runs, and when it finishes
its full pages go into the cache instead of back to the allocator. Jobs that bring their own
pages never use the cache, and neither do jobs with input embeddings but no `cache_keys`.

Threads: `submit` is called from gRPC handlers; `step` runs on the engine thread (`start`) or,
with the thread not started, on the caller's (an in-process driver).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from prefill_worker.prefix_cache import CacheNode, PrefixCache, TokenKey
from shared.kv_cache import pages_needed
from shared.runner import ModelRunner, SeqStep
from shared.sampling import Sampled, SamplingConfig, sample_one

if TYPE_CHECKING:
    from shared.grammar import GrammarState

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    future: Future = dataclasses.field(default_factory=Future)
    input_embeds: torch.Tensor | None = None  # [S, D] with image rows spliced in; None: text only
    # Pages already reserved for this prompt in this engine's own cache (a colocated worker):
    # the prefill writes its latents there, keeps the pages and returns no `kv`.
    pages: list[int] | None = None
    # The prefix cache's key of each prompt token (`prefix_cache.prompt_keys`); None: the token
    # ids, which is right only for a prompt without images, so a job with `input_embeds` and no
    # keys skips the cache.
    cache_keys: list[TokenKey] | None = None
    grammar: GrammarState | None = None  # `response_format`: masks the first token

    def keys(self) -> list[TokenKey] | None:
        if self.pages is not None or (self.input_embeds is not None and self.cache_keys is None):
            return None
        return self.prompt_ids if self.cache_keys is None else self.cache_keys


@dataclasses.dataclass
class PrefillResult:
    first: Sampled
    # The prompt's latents for the KV sender, [L, S, r] and [L, S, R]; None when the job brought
    # its own pages.
    ckv: torch.Tensor | None
    kpe: torch.Tensor | None = None
    num_cached: int = 0  # prompt tokens whose latents came from the prefix cache

    @property
    def kv(self) -> torch.Tensor | None:
        """[L, S, r+R], a copy (for comparisons; the sender takes `ckv` and `kpe`)."""
        return None if self.ckv is None else torch.cat([self.ckv, self.kpe], dim=-1)


@dataclasses.dataclass
class _Started:
    """A job whose pages are allocated; `num_done` prompt tokens are in the cache."""

    job: PrefillJob
    pages: list[int]
    num_done: int = 0
    cached: list[CacheNode] = dataclasses.field(default_factory=list)  # locked, pages[:len]

    @property
    def owns_pages(self) -> bool:
        return self.job.pages is None

    @property
    def num_left(self) -> int:
        return len(self.job.prompt_ids) - self.num_done

    def embeds(self, num: int) -> torch.Tensor | None:
        """Input embeddings [num, D] of the next `num` prompt tokens, if the job brought any."""
        rows = self.job.input_embeds
        return None if rows is None else rows[self.num_done : self.num_done + num]


class PrefillEngine:
    def __init__(
        self, runner: ModelRunner, max_prefill_chunk: int = 8192, prefix_cache: bool = False
    ) -> None:
        assert max_prefill_chunk >= 1, max_prefill_chunk
        self.runner = runner
        self.max_prefill_chunk = max_prefill_chunk
        self.prefix_cache = (
            PrefixCache(runner.allocator, runner.page_size) if prefix_cache else None
        )
        self._jobs: queue.Queue[PrefillJob] = queue.Queue()
        self._pending: list[PrefillJob] = []
        self._started: list[_Started] = []
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: PrefillJob) -> Future:
        if not job.prompt_ids:
            raise ValueError("empty prompt")
        rows = job.input_embeds
        if rows is not None and rows.shape[0] != len(job.prompt_ids):
            # Caught here: inside a step it would fail every job of that step.
            raise ValueError(f"{rows.shape[0]} embedding rows for {len(job.prompt_ids)} tokens")
        if job.cache_keys is not None and len(job.cache_keys) != len(job.prompt_ids):
            raise ValueError(f"{len(job.cache_keys)} cache keys for {len(job.prompt_ids)} tokens")
        total = pages_needed(len(job.prompt_ids), self.runner.page_size)
        if total > self.runner.allocator.num_pages:
            raise ValueError(f"prompt of {len(job.prompt_ids)} tokens exceeds this worker's cache")
        self._jobs.put(job)
        return job.future

    @property
    def num_waiting(self) -> int:
        """Jobs not finished yet: queued, waiting for pages, or part-way through."""
        return self._jobs.qsize() + len(self._pending) + len(self._started)

    def has_work(self) -> bool:
        return self.num_waiting > 0

    @property
    def num_free_pages(self) -> int:
        """Pages a new job could get: free ones and cached ones no running job holds."""
        cache = self.prefix_cache
        return self.runner.allocator.num_free + (cache.num_evictable if cache else 0)

    @property
    def num_cached_pages(self) -> int:
        return self.prefix_cache.num_pages if self.prefix_cache else 0

    def _loop(self) -> None:
        while True:
            if not self._pending and not self._started:
                self._pending.append(self._jobs.get())  # sleeps until a job arrives
            self.step()

    def step(self) -> int:
        """Runs one forward over up to `max_prefill_chunk` prompt tokens; never blocks.

        Returns the number of prompt tokens it ran (0: nothing to do)."""
        self._drain_queue()
        chunks = self._plan()
        if not chunks:
            return 0
        try:
            self._run(chunks)
        except Exception as exc:  # a failed step fails its jobs, not the worker
            logger.exception("prefill step failed")
            failed = [started for started, _ in chunks if started in self._started]
            for started in failed:
                self._started.remove(started)
                if started.owns_pages:
                    self._release(started, keep=False)
                started.job.future.set_exception(exc)
        return sum(num for _, num in chunks)

    def _drain_queue(self) -> None:
        while True:
            try:
                self._pending.append(self._jobs.get_nowait())
            except queue.Empty:
                return

    def _plan(self) -> list[tuple[_Started, int]]:
        """(job, chunk length) pairs for the next forward, within the token budget."""
        budget = self.max_prefill_chunk
        chunks = []
        for started in self._started:
            if budget == 0:
                return chunks
            num = min(started.num_left, budget)
            chunks.append((started, num))
            budget -= num
        while budget > 0 and self._pending:
            job = self._pending[0]
            started = _Started(job, job.pages) if job.pages is not None else self._take_pages(job)
            if started is None:
                break  # arrival order: later jobs wait too
            self._pending.pop(0)
            if not job.future.set_running_or_notify_cancel():
                if started.owns_pages:  # the caller went away while the job waited
                    self._release(started, keep=False)
                continue
            self._started.append(started)
            num = min(started.num_left, budget)
            chunks.append((started, num))
            budget -= num
        return chunks

    def _take_pages(self, job: PrefillJob) -> _Started | None:
        """Starts a job on its cached prefix (locked) and fresh pages; None while too few pages
        are free."""
        page_size, cache = self.runner.page_size, self.prefix_cache
        num_pages = pages_needed(len(job.prompt_ids), page_size)
        keys = job.keys() if cache else None
        if keys is None:
            if not self.runner.allocator.can_allocate(num_pages):
                return None
            return _Started(job, self.runner.allocator.allocate(num_pages))
        cached = cache.match(keys, (len(keys) - 1) // page_size)  # the last token is computed
        cache.lock(cached)
        fresh = cache.allocate(num_pages - len(cached))
        if fresh is None:
            cache.unlock(cached)
            return None
        pages = [node.page for node in cached] + fresh
        return _Started(job, pages, len(cached) * page_size, cached)

    def _release(self, started: _Started, keep: bool) -> None:
        """Gives back a job's own pages: its full pages into the prefix cache when `keep` (its
        latents are complete), the rest to the allocator; unlocks its cached prefix."""
        cache, job = self.prefix_cache, started.job
        keys = job.keys() if cache else None
        if keys is None:
            self.runner.allocator.free(started.pages)
            return
        num_full = len(keys) // self.runner.page_size if keep else len(started.cached)
        spare = cache.insert(keys, started.pages[:num_full]) if keep else []
        cache.unlock(started.cached)
        self.runner.allocator.free(spare + started.pages[num_full:])

    def _run(self, chunks: list[tuple[_Started, int]]) -> None:
        steps = [
            SeqStep(
                s.job.prompt_ids[s.num_done : s.num_done + num], s.num_done, s.pages, s.embeds(num)
            )
            for s, num in chunks
        ]
        logits = self.runner.run(steps)  # [B, V]
        for row, (started, num) in zip(logits, chunks):
            started.num_done += num
            if started.num_left == 0:
                self._finish(started, row)

    def _finish(self, started: _Started, last_logits: torch.Tensor) -> None:
        job = started.job
        first = sample_one(last_logits, job.sampling, 0, job.prompt_ids, grammar=job.grammar)
        if not started.owns_pages:
            self._started.remove(started)
            job.future.set_result(PrefillResult(first, None))
            return
        ckv, kpe = self.runner.cache.gather(started.pages, len(job.prompt_ids))
        self._started.remove(started)
        self._release(started, keep=True)
        num_cached = len(started.cached) * self.runner.page_size
        job.future.set_result(PrefillResult(first, ckv, kpe, num_cached))
