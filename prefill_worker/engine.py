"""The prefill engine: batches waiting prompts into ragged forward passes of bounded size.

Each forward (`step`) takes at most `max_prefill_chunk` prompt tokens: first the next chunks of
prompts already started, in arrival order, then new prompts while the budget and the free pages
last. A prompt longer than the budget spans several steps (chunked prefill); its later chunks
attend over the latents its earlier chunks left in the cache. A job gets all its pages when it
starts. When its last chunk has run, its first token is sampled, its latents are copied out as
one tensor [L, S, r+R] for the KV sender, and its pages are freed before its future resolves.
A job that brings its own pages (`PrefillJob.pages`: a colocated worker, whose decode engine
reserved them in this same cache) is computed in place; nothing is copied out or freed.

Threads: `submit` is called from gRPC handlers; `step` runs on the engine thread (`start`) or,
with the thread not started, on the caller's (an in-process driver).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future

import torch

from shared.kv_cache import pages_needed
from shared.runner import ModelRunner, SeqStep
from shared.sampling import Sampled, SamplingConfig, sample_one

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


@dataclasses.dataclass
class PrefillResult:
    first: Sampled
    kv: torch.Tensor | None  # [L, S, r+R]; None when the job brought its own pages


@dataclasses.dataclass
class _Started:
    """A job whose pages are allocated; `num_done` prompt tokens are in the cache."""

    job: PrefillJob
    pages: list[int]
    num_done: int = 0

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
    def __init__(self, runner: ModelRunner, max_prefill_chunk: int = 8192) -> None:
        assert max_prefill_chunk >= 1, max_prefill_chunk
        self.runner = runner
        self.max_prefill_chunk = max_prefill_chunk
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
                    self.runner.allocator.free(started.pages)
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
            own = job.pages is None
            num_pages = pages_needed(len(job.prompt_ids), self.runner.page_size) if own else 0
            if not self.runner.allocator.can_allocate(num_pages):
                break  # arrival order: later jobs wait too
            self._pending.pop(0)
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller went away while the job waited
            started = _Started(job, self.runner.allocator.allocate(num_pages) if own else job.pages)
            self._started.append(started)
            num = min(started.num_left, budget)
            chunks.append((started, num))
            budget -= num
        return chunks

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
        first = sample_one(last_logits, job.sampling, 0, job.prompt_ids)
        if not started.owns_pages:
            self._started.remove(started)
            job.future.set_result(PrefillResult(first, None))
            return
        ckv, kpe = self.runner.cache.gather(started.pages, len(job.prompt_ids))
        kv = torch.cat([ckv, kpe], dim=-1)  # [L, S, r+R]
        self._started.remove(started)
        self.runner.allocator.free(started.pages)
        job.future.set_result(PrefillResult(first, kv))
