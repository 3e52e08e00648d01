"""Prefill and decode engines in one process and one thread, without gRPC or a KV transfer.

For benchmarks and engine tests of the product path: a request is reserved on the decode
engine, prefilled by a `PrefillEngine` (its own runner and cache, as in a prefill worker), its
latents are written into the reserved pages as the `KVReceiver` writes them, and the decode
engine admits it with the first token the prefill sampled. The request counts as transferring
from submission on (the pages are spoken for, so no reservation deadline applies, and an abort
takes effect when the prefill hands over). Neither engine's thread is started; each `step` runs
one prefill step when prompts wait, hands finished prefills over, then runs one decode step.
"""

from __future__ import annotations

from concurrent.futures import Future

from decode_worker.engine import DecodeEngine, Request
from prefill_worker.engine import PrefillEngine, PrefillJob, PrefillResult


class ColocatedDriver:
    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine) -> None:
        self.prefill = prefill
        self.decode = decode
        self._prefilling: list[tuple[Request, list[int], Future]] = []

    def submit(self, request: Request) -> None:
        """Reserves the prompt's decode pages (raises OutOfPagesError) and queues its prefill."""
        self.decode.reserve(request)
        pages = self.decode.pages_of(request.request_id)
        assert pages is not None, f"request {request.request_id} vanished after its reservation"
        job = PrefillJob(request.request_id, request.prompt_ids, request.sampling)
        if request.grammar is not None:  # the prefill's own matcher, as on a prefill worker
            job.grammar = request.grammar.restart()
        try:
            self.prefill.submit(job)
        except ValueError as exc:
            self.decode.on_kv_ready(request.request_id, None, str(exc))
            return
        self._prefilling.append((request, pages, job.future))

    def step(self) -> bool:
        """One prefill step (if prompts wait) and one decode step; False when all is done."""
        self.prefill.step()
        self._hand_over()
        decoded = self.decode.run_once()
        return decoded or bool(self._prefilling) or self.decode.has_admissions()

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _hand_over(self) -> None:
        waiting = []
        for request, pages, future in self._prefilling:
            if not future.done():
                waiting.append((request, pages, future))
                continue
            error = future.exception()
            if error is not None:
                self.decode.on_kv_ready(request.request_id, None, f"prefill failed: {error}")
                continue
            result: PrefillResult = future.result()
            self._write(pages, result)
            self.decode.on_kv_ready(request.request_id, result.first)
        self._prefilling = waiting

    def _write(self, pages: list[int], result: PrefillResult) -> None:
        self.decode.runner.cache.scatter(pages, result.ckv, result.kpe)
