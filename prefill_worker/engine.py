"""The prefill engine: batches waiting prompts into one ragged forward pass.

Each job's latents are computed into pages of this worker's own cache, copied out as one tensor
[L, S, r+R] for the KV sender, and the pages are freed before the job's future resolves.
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


@dataclasses.dataclass
class PrefillResult:
    first: Sampled
    kv: torch.Tensor  # [L, S, r+R]


class PrefillEngine:
    def __init__(self, runner: ModelRunner, max_batch_tokens: int = 8192) -> None:
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self._jobs: queue.Queue[PrefillJob] = queue.Queue()
        self._pending: list[PrefillJob] = []
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: PrefillJob) -> Future:
        total = pages_needed(len(job.prompt_ids), self.runner.page_size)
        if total > self.runner.allocator.num_pages:
            raise ValueError(f"prompt of {len(job.prompt_ids)} tokens exceeds this worker's cache")
        self._jobs.put(job)
        return job.future

    @property
    def num_waiting(self) -> int:
        return self._jobs.qsize() + len(self._pending)

    def _take_batch(self) -> list[tuple[PrefillJob, list[int]]]:
        """Jobs that fit the token budget and the free pages, in arrival order."""
        if not self._pending:
            self._pending.append(self._jobs.get())
        while not self._jobs.empty():
            self._pending.append(self._jobs.get_nowait())
        batch, tokens = [], 0
        for job in list(self._pending):
            num_pages = pages_needed(len(job.prompt_ids), self.runner.page_size)
            over_budget = batch and tokens + len(job.prompt_ids) > self.max_batch_tokens
            if over_budget or not self.runner.allocator.can_allocate(num_pages):
                break
            self._pending.remove(job)
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller went away while the job waited
            batch.append((job, self.runner.allocator.allocate(num_pages)))
            tokens += len(job.prompt_ids)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch fails its jobs, not the worker
                logger.exception("prefill batch failed")
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                for _, pages in batch:
                    self.runner.allocator.free(pages)

    def _run(self, batch: list[tuple[PrefillJob, list[int]]]) -> None:
        steps = [SeqStep(job.prompt_ids, 0, pages) for job, pages in batch]
        logits = self.runner.run(steps)  # [B, V]
        for row, (job, pages) in zip(logits, batch):
            first = sample_one(row, job.sampling, 0, job.prompt_ids)
            ckv, kpe = self.runner.cache.gather(pages, len(job.prompt_ids))
            kv = torch.cat([ckv, kpe], dim=-1)  # [L, S, r+R]
            job.future.set_result(PrefillResult(first, kv))
