"""Prometheus metrics of the router, named `kimiserve:*`, served through `Control.Metrics`.

Latencies are histograms (seconds); the parts of the time to first token are: queue (until the
decode worker reserved pages), prefill (the prefill worker's queue and compute), transfer (the
KV push), vision (image encoding) and first decode step (prefill answer to first token seen).
Pool gauges are refreshed from heartbeats by `update_pool_gauges` (for the vision pool also its
embedding caches and pinned requests); `EXPERT_TOKENS` keeps the expert load each heartbeat of a
decode worker run with `--expert-stats` carries.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from proto import control_pb2 as ctl

logger = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _histogram(name: str, doc: str) -> Histogram:
    return Histogram(f"kimiserve:{name}", doc, buckets=_LATENCY, registry=REGISTRY)


TTFT = _histogram("time_to_first_token_seconds", "Time to first token")
ITL = _histogram("inter_token_latency_seconds", "Time between consecutive tokens")
E2E = _histogram("e2e_request_latency_seconds", "Request start to last token")
QUEUE = _histogram("queue_seconds", "Start until the decode worker reserved pages")
VISION = _histogram("vision_seconds", "Image encoding")
PREFILL = _histogram("prefill_seconds", "Prefill worker queue and compute")
TRANSFER = _histogram("kv_transfer_seconds", "KV push from prefill to decode")
FIRST_DECODE = _histogram("first_decode_step_seconds", "Prefill answer to the first token")
PROMPT_TOKENS = Counter("kimiserve:prompt_tokens", "Prompt tokens (per sample)", registry=REGISTRY)
# Divided by prompt_tokens: the prefix cache's hit rate in tokens.
CACHED_PROMPT_TOKENS = Counter("kimiserve:cached_prompt_tokens", "Prompt tokens (per sample) "
                               "reused from a prefill worker's prefix cache", registry=REGISTRY)  # fmt: skip
GENERATION_TOKENS = Counter("kimiserve:generation_tokens", "Generated tokens", registry=REGISTRY)
TRANSFER_BYTES = Counter("kimiserve:kv_transfer_bytes", "KV bytes pushed", registry=REGISTRY)
REQUESTS = Counter("kimiserve:requests", "Finished samples", ["finish_reason"], registry=REGISTRY)
ABORTS = Counter("kimiserve:aborts", "Samples aborted", ["reason"], registry=REGISTRY)
FAILURES = Counter("kimiserve:failures", "Samples failed", ["reason"], registry=REGISTRY)
POOL_WORKERS = Gauge("kimiserve:pool_workers", "Workers", ["role", "state"], registry=REGISTRY)
POOL_QUEUE = Gauge("kimiserve:pool_queue_depth", "Requests waiting", ["role"], registry=REGISTRY)
POOL_FREE_PAGES = Gauge("kimiserve:pool_free_pages", "Free KV pages", ["role"], registry=REGISTRY)
POOL_CACHED_PAGES = Gauge("kimiserve:pool_cached_pages", "KV pages held by prefix caches "
                          "(the evictable ones also count as free)", ["role"], registry=REGISTRY)  # fmt: skip
POOL_INFLIGHT = Gauge("kimiserve:pool_inflight", "Requests in flight", ["role"], registry=REGISTRY)
POOL_SWAPPED = Gauge("kimiserve:pool_swapped", "Requests swapped out to host memory", ["role"],
                     registry=REGISTRY)  # fmt: skip
POOL_RUNNING = Gauge("kimiserve:pool_running", "Requests running on the workers (vision: images "
                     "in the encoder)", ["role"], registry=REGISTRY)  # fmt: skip
POOL_PINNED = Gauge("kimiserve:pool_pinned", "Requests whose image embeddings a vision worker "
                    "holds until they end", ["role"], registry=REGISTRY)  # fmt: skip
POOL_CACHE_BYTES = Gauge("kimiserve:pool_cache_bytes", "Bytes of image embeddings in the vision "
                         "workers' caches", ["role"], registry=REGISTRY)  # fmt: skip
POOL_CACHED_IMAGES = Gauge("kimiserve:pool_cached_images", "Images in the vision workers' "
                           "caches", ["role"], registry=REGISTRY)  # fmt: skip


class ExpertTokens:
    """`kimiserve:expert_tokens_total{layer,expert}`: tokens routed to each expert, summed over
    workers (and over the ranks of expert-parallel workers, which beat separately).

    A heartbeat carries the worker's counts since it started; the latest per worker is kept and
    summed when scraped, so a heartbeat costs one copy. When a worker id comes back at a new
    address or its counts go down (a new process) or change layout, its previous counts move
    into a base; a removed worker's last counts stay. So the counter never decreases.
    """

    def __init__(self) -> None:
        # worker id -> (address, layer of each row, counts [rows x experts] flattened)
        self._latest: dict[str, tuple[str, tuple[int, ...], list[int]]] = {}
        self._base: dict[tuple[int, int], int] = {}  # (layer, expert) -> tokens

    def update(self, worker_id: str, address: str, load: ctl.WorkerLoad) -> None:
        if not load.expert_tokens:
            return
        layers, counts = tuple(load.expert_token_layers), list(load.expert_tokens)
        if not layers or len(counts) % len(layers):
            logger.warning("%s sent %d expert counts for %d layers; ignored", worker_id,
                           len(counts), len(layers))  # fmt: skip
            return
        previous = self._latest.get(worker_id)
        if previous is not None and (
            previous[:2] != (address, layers)
            or len(previous[2]) != len(counts)
            or any(new < old for new, old in zip(counts, previous[2]))
        ):
            _add_counts(self._base, *previous[1:])
        self._latest[worker_id] = (address, layers, counts)

    def collect(self):
        totals = dict(self._base)
        for _, layers, counts in self._latest.values():
            _add_counts(totals, layers, counts)
        if not totals:
            return
        family = CounterMetricFamily("kimiserve:expert_tokens", "Tokens routed to each expert "
                                     "(once per chosen expert)", labels=["layer", "expert"])  # fmt: skip
        for (layer, expert), value in sorted(totals.items()):
            family.add_metric([str(layer), str(expert)], value)
        yield family


def _add_counts(totals: dict[tuple[int, int], int], layers: tuple[int, ...], counts: list[int]):
    num_experts = len(counts) // len(layers)
    for i, count in enumerate(counts):
        key = (layers[i // num_experts], i % num_experts)
        totals[key] = totals.get(key, 0) + count


EXPERT_TOKENS = ExpertTokens()
REGISTRY.register(EXPERT_TOKENS)


class Preemptions:
    """`kimiserve:decode_preemptions_total`: running requests decode workers swapped out for
    lack of KV pages. Heartbeats carry each worker's count since it started; the counter grows
    by the change, and a count that went down (a restarted worker) counts from zero again."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._latest: dict[str, int] = {}  # worker id -> its last reported count
        self.counter = Counter("kimiserve:decode_preemptions", "Running requests swapped out "
                               "for lack of KV pages", registry=registry)  # fmt: skip

    def update(self, worker_id: str, load: ctl.WorkerLoad) -> None:
        previous = self._latest.get(worker_id, 0)
        count = load.num_preemptions
        self.counter.inc(count - previous if count >= previous else count)
        self._latest[worker_id] = count


PREEMPTIONS = Preemptions(REGISTRY)


class VisionCacheHits:
    """`kimiserve:vision_cache_hits_total` and `kimiserve:vision_cache_misses_total`: images
    the vision workers answered from their embedding caches, and images they encoded. Counted
    from each heartbeat's totals since the worker started, as `Preemptions` does."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._latest: dict[str, tuple[int, int]] = {}  # worker id -> (hits, misses) last seen
        self.hits = Counter("kimiserve:vision_cache_hits", "Images answered from a vision "
                            "worker's embedding cache", registry=registry)  # fmt: skip
        self.misses = Counter("kimiserve:vision_cache_misses", "Images a vision worker "
                              "encoded", registry=registry)  # fmt: skip

    def update(self, worker_id: str, load: ctl.WorkerLoad) -> None:
        hits, misses = load.num_cache_hits, load.num_cache_misses
        if not (hits or misses or worker_id in self._latest):
            return  # not a vision worker, or one that has not encoded yet
        old_hits, old_misses = self._latest.get(worker_id, (0, 0))
        restarted = hits < old_hits or misses < old_misses  # a new process counts from zero
        self.hits.inc(hits if restarted else hits - old_hits)
        self.misses.inc(misses if restarted else misses - old_misses)
        self._latest[worker_id] = (hits, misses)


VISION_CACHE_HITS = VisionCacheHits(REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)


def update_pool_gauges(pools) -> None:
    for role, pool in pools.items():
        for state in ("ready", "draining", "lost"):
            count = sum(1 for w in pool.workers if w.state == state)
            POOL_WORKERS.labels(role, state).set(count)
        POOL_QUEUE.labels(role).set(sum(w.load.num_waiting for w in pool.workers))
        POOL_FREE_PAGES.labels(role).set(sum(w.load.num_free_pages for w in pool.workers))
        POOL_CACHED_PAGES.labels(role).set(sum(w.load.num_cached_pages for w in pool.workers))
        POOL_INFLIGHT.labels(role).set(sum(w.num_inflight for w in pool.workers))
        POOL_SWAPPED.labels(role).set(sum(w.load.num_swapped for w in pool.workers))
        POOL_RUNNING.labels(role).set(sum(w.load.num_running for w in pool.workers))
        if role == "vision":
            POOL_PINNED.labels(role).set(sum(w.num_pinned for w in pool.workers))
            POOL_CACHE_BYTES.labels(role).set(sum(w.load.cache_bytes for w in pool.workers))
            POOL_CACHED_IMAGES.labels(role).set(sum(w.load.num_cached_images for w in pool.workers))


class SampleTimer:
    """Observes one sample's timeline; every method is cheap and called on the event loop."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.start = time.perf_counter()
        self.last_token = 0.0
        self.prefill_answered = 0.0
        PROMPT_TOKENS.inc(num_prompt_tokens)

    def reserved(self) -> None:
        QUEUE.observe(time.perf_counter() - self.start)

    def prefill_done(self, prefill_seconds: float, transfer_seconds: float, nbytes: int,
                     num_cached: int = 0) -> None:  # fmt: skip
        self.prefill_answered = time.perf_counter()
        PREFILL.observe(prefill_seconds)
        TRANSFER.observe(transfer_seconds)
        TRANSFER_BYTES.inc(nbytes)
        CACHED_PROMPT_TOKENS.inc(num_cached)

    def token(self) -> None:
        now = time.perf_counter()
        if self.last_token:
            ITL.observe(now - self.last_token)
        else:
            TTFT.observe(now - self.start)
            if self.prefill_answered:
                FIRST_DECODE.observe(max(0.0, now - self.prefill_answered))
        self.last_token = now
        GENERATION_TOKENS.inc()

    def finished(self, reason: str) -> None:
        E2E.observe(time.perf_counter() - self.start)
        REQUESTS.labels(reason).inc()
