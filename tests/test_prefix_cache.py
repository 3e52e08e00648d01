"""The prefill worker's prefix cache: the radix tree on its own (matching, image keys, locks, LRU
eviction, page accounting), in the prefill engine (a hit gives the KV and first token of a miss;
prompts sharing a prefix in one batch; eviction when pages run short), and through a live stack
with few pages (answers equal the uncached ones; counts, status and metrics)."""

from __future__ import annotations

import re
import time

import grpc
import httpx
import pytest
import torch
from stack_utils import router_address, start_stack

from prefill_worker.engine import PrefillEngine, PrefillJob
from prefill_worker.prefix_cache import PrefixCache, prompt_keys
from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from shared.kv_cache import PageAllocator
from shared.model.generate import greedy_generate
from shared.model.loader import load_text_model
from shared.runner import ModelRunner
from shared.sampling import SamplingConfig

PAGE = 4
GREEDY = SamplingConfig(temperature=0.0)

# ---------------------------------------------------------------- the tree


def _cache(num_pages: int = 16) -> PrefixCache:
    return PrefixCache(PageAllocator(num_pages), PAGE)


def _store(cache: PrefixCache, keys: list) -> list[int]:
    """Runs a 'job' on `keys`: matches, takes fresh pages, inserts its full pages, unlocks."""
    path = cache.match(keys, (len(keys) - 1) // PAGE)
    cache.lock(path)
    fresh = cache.allocate(-(-len(keys) // PAGE) - len(path))
    assert fresh is not None
    pages = [n.page for n in path] + fresh
    full = len(keys) // PAGE
    spare = cache.insert(keys, pages[:full])
    cache.unlock(path)
    cache.allocator.free(spare + pages[full:])
    return pages[:full]


def test_match_returns_the_longest_cached_page_aligned_prefix():
    cache = _cache()
    first = _store(cache, list(range(10)))  # pages [0..3] [4..7]; 8, 9 not a full page
    assert len(first) == 2 and cache.num_pages == 2 and cache.allocator.num_free == 14
    path = cache.match(list(range(8)) + [99, 98, 97, 96], max_pages=3)
    assert [n.page for n in path] == first
    assert [n.page for n in cache.match([0, 1, 2, 3, 9, 9, 9, 9], 2)] == first[:1]
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 7], max_pages=1)[0].page == first[0]
    assert cache.match([1, 2, 3, 4], 1) == [] and cache.match([0, 1, 2], 1) == []


def test_insert_keeps_one_copy_of_a_prefix_computed_twice():
    cache = _cache()
    keys = list(range(8))
    assert cache.insert(keys, [5, 6]) == []
    # 7 repeats page 5's prefix; 6 is the caller's own cached page, kept where it is
    assert cache.insert(keys + [8, 9, 10, 11], [7, 6, 9]) == [7]
    assert [n.page for n in cache.match(keys + [8, 9, 10, 11], 3)] == [5, 6, 9]
    assert cache.num_pages == 3


def test_image_placeholders_are_keyed_by_image_hash_and_row():
    pad = 7
    keys = prompt_keys([1, pad, pad, pad, 2, pad, pad], pad, [("aa", 3), ("bb", 2)])
    assert keys == [1, ("aa", 0), ("aa", 1), ("aa", 2), 2, ("bb", 0), ("bb", 1)]
    with pytest.raises(ValueError, match="more image placeholders"):
        prompt_keys([pad, pad], pad, [("aa", 1)])
    with pytest.raises(ValueError, match="fewer image placeholders"):
        prompt_keys([pad], pad, [("aa", 2)])
    cache = _cache()
    ids = [1, 2, 3, 4, pad, pad, pad, pad, 5]  # the same ids, different images
    with_a = prompt_keys(ids, pad, [("aa", 4)])
    with_b = prompt_keys(ids, pad, [("bb", 4)])
    first = _store(cache, with_a)
    assert [n.page for n in cache.match(with_a, 2)] == first
    assert [n.page for n in cache.match(with_b, 2)] == first[:1]  # the text page only
    assert [n.page for n in cache.match(ids, 2)] == first[:1]  # nor the placeholder ids


def test_locked_paths_are_not_evicted_and_unlock_makes_them_evictable():
    cache = _cache(num_pages=6)
    _store(cache, list(range(12)))  # 3 pages
    path = cache.match(list(range(12)), 3)
    cache.lock(path[:2])  # a job reads the first two pages
    cache.lock(path[:1])  # and another the first
    assert (cache.num_pages, cache.num_locked, cache.num_evictable) == (3, 2, 1)
    assert cache.allocate(5) is None  # 3 free + 1 evictable
    assert cache.num_pages == 3  # a refused allocation evicts nothing
    assert cache.evict(10) == 1 and cache.num_pages == 2
    cache.unlock(path[:2])
    assert (cache.num_locked, cache.num_evictable) == (1, 1)
    cache.unlock(path[:1])
    with pytest.raises(AssertionError, match="unlocked more often"):
        cache.unlock(path[:1])
    assert cache.evict(10) == 2
    assert cache.allocator.num_free == 6 and cache.num_pages == 0


def test_eviction_frees_least_recently_used_leaves_first():
    cache = _cache(num_pages=12)
    a = _store(cache, [1] * 12)  # a chain of 3 pages
    b = _store(cache, [2] * 8)
    c = _store(cache, [1] * 4 + [3] * 4)  # shares a's first page, adds one
    cache.match([2] * 8, 2)  # b used again: a's tail is now the oldest
    assert _held(cache) == set(a + b + c)
    assert cache.evict(2) == 2
    assert _held(cache) == {a[0], c[1], *b}  # a's leaf, then its parent, which became a leaf
    assert cache.evict(1) == 1
    assert _held(cache) == {a[0], *b}  # c's leaf: older than b's
    assert cache.evict(10) == 3 and _held(cache) == set()
    assert cache.allocator.num_free == 12


def _held(cache: PrefixCache) -> set[int]:
    pages, nodes = set(), list(cache.root.children.values())
    while nodes:
        node = nodes.pop()
        pages.add(node.page)
        nodes.extend(node.children.values())
    return pages


def test_free_pages_return_to_the_start_value_after_evicting_everything():
    cache = _cache(num_pages=16)
    for i in range(6):
        _store(cache, [i % 3] * 4 + list(range(i, i + 9)))
    assert cache.num_locked == 0
    assert cache.allocator.num_free + cache.num_evictable == 16
    assert cache.num_pages == cache.evict(cache.num_pages)
    assert cache.allocator.num_free == 16 and cache.num_pages == 0


# ---------------------------------------------------------------- in the prefill engine


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_model(tiny_checkpoint)


class _Engines:
    """Makes prefill engines; after the test, each has every page free or evictable, and all
    free once the cache is emptied."""

    def __init__(self, model) -> None:
        self.model = model
        self.made: list[PrefillEngine] = []

    def __call__(self, num_pages: int = 96, chunk: int = 100_000, cache: bool = True):
        engine = PrefillEngine(ModelRunner(self.model, num_pages, PAGE), chunk, prefix_cache=cache)
        self.made.append(engine)
        return engine


@pytest.fixture
def engines(model):
    made = _Engines(model)
    yield made
    for engine in made.made:
        allocator = engine.runner.allocator
        assert engine.num_free_pages == allocator.num_pages, "pages leaked"
        if engine.prefix_cache is not None:
            assert engine.prefix_cache.num_locked == 0
            engine.prefix_cache.evict(allocator.num_pages)
        assert allocator.num_free == allocator.num_pages, "pages leaked"


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1792, (n,), generator=gen).tolist() for n in lengths]


def _prefill(engine: PrefillEngine, prompts: list[list[int]], embeds=None, keys=None):
    jobs = [PrefillJob(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for i, job in enumerate(jobs):
        job.input_embeds = embeds[i] if embeds else None
        job.cache_keys = keys[i] if keys else None
        engine.submit(job)
    while engine.has_work():
        assert engine.step() > 0
    return [job.future.result() for job in jobs]


# A hit computes only the uncached rows, and float32 matrix products round differently for
# different row counts (see test_engine.KV_ATOL), so the KV of a hit equals a miss's within a
# few ulps, not bit for bit; a wrong position, page or mask would differ by more than 1e-2.
KV_ATOL = 1e-5


def _assert_same(result, reference) -> None:
    assert result.kv.shape == reference.kv.shape
    torch.testing.assert_close(result.kv, reference.kv, atol=KV_ATOL, rtol=0)
    assert result.first.token_id == reference.first.token_id
    assert result.first.logprob == pytest.approx(reference.first.logprob, abs=1e-5)


def test_hit_gives_the_kv_and_first_token_of_a_miss(engines, model):
    shared, tail_a, tail_b = _prompts([41, 6, 11], seed=5)
    engine = engines()
    (miss,) = _prefill(engine, [shared + tail_a])
    assert miss.num_cached == 0 and engine.num_cached_pages == 11  # 47 tokens: 11 full pages
    (hit,) = _prefill(engine, [shared + tail_b])
    assert hit.num_cached == 40  # the 10 full pages of the shared 41 tokens
    (reference,) = _prefill(engines(cache=False), [shared + tail_b])
    _assert_same(hit, reference)
    assert hit.first.token_id == greedy_generate(model, shared + tail_b, 1)[0]
    (again,) = _prefill(engine, [shared + tail_b])  # 52 tokens: all but the last page cached
    assert again.num_cached == 48
    _assert_same(again, reference)
    # The KV of the cached pages is the very tensor the first prompt left: bit for bit.
    assert torch.equal(hit.kv[:, :40], miss.kv[:, :40])


def test_prompt_of_whole_pages_computes_its_last_page(engines):
    (prompt,) = _prompts([16], seed=2)
    engine = engines()
    first, second = _prefill(engine, [prompt]), _prefill(engine, [prompt])
    assert first[0].num_cached == 0 and second[0].num_cached == 12
    _assert_same(second[0], first[0])


def test_batch_of_three_where_two_share_a_long_prefix(engines):
    shared, a, b, c, d = _prompts([45, 7, 9, 30, 5], seed=8)
    prompts = [shared + a, c, shared + b]  # 52, 30 and 54 tokens
    references = _prefill(engines(cache=False), prompts + [shared + d])
    one_pass = engines()
    results = _prefill(one_pass, prompts)
    assert [r.num_cached for r in results] == [0, 0, 0]  # one forward: nothing cached before
    for result, reference in zip(results, references):
        _assert_same(result, reference)
    # 13 + 7 + 13 full pages, the 11 pages of the shared prefix once
    assert one_pass.num_cached_pages == 13 + 7 + 13 - 11
    # In steps of 24 tokens the first prompt ends (step 3) before the third starts (step 4,
    # beside the second's last chunk), so the third reuses the shared prefix.
    chunked = engines(chunk=24)
    results = _prefill(chunked, prompts)
    assert [r.num_cached for r in results] == [0, 0, 44]
    for result, reference in zip(results, references):
        _assert_same(result, reference)
    for engine in (one_pass, chunked):
        (late,) = _prefill(engine, [shared + d])
        assert late.num_cached == 44
        _assert_same(late, references[3])


def test_different_images_at_the_same_place_share_no_page(engines, model):
    pad = 1700  # any id: the engine replaces its rows with the image rows given
    text, image_a, image_b = _prompts([9, 1, 1], seed=4)
    prompt = text + [pad] * 12 + text
    with torch.no_grad():
        base = model.embed_tokens(torch.tensor(prompt))
    gen = torch.Generator().manual_seed(1)
    embeds = []
    for _ in range(2):
        rows = base.clone()
        rows[9:21] = torch.randn(12, base.shape[1], generator=gen) * 0.05
        embeds.append(rows)
    keys = [prompt_keys(prompt, pad, [(name, 12)]) for name in ("a", "b")]
    references = _prefill(engines(cache=False), [prompt, prompt], embeds, keys)
    engine = engines()
    (first,) = _prefill(engine, [prompt], embeds[:1], keys[:1])
    (other,) = _prefill(engine, [prompt], embeds[1:], keys[1:])
    assert other.num_cached == 8  # the 9 text tokens: 2 pages; the third has image rows
    _assert_same(first, references[0])
    _assert_same(other, references[1])
    (same,) = _prefill(engine, [prompt], embeds[:1], keys[:1])
    assert same.num_cached == 28
    _assert_same(same, references[0])
    (no_keys,) = _prefill(engine, [prompt], embeds[:1])  # embeddings without keys: no cache
    assert no_keys.num_cached == 0
    _assert_same(no_keys, references[0])


def test_eviction_under_pressure_keeps_serving(engines, model):
    prompts = _prompts([30, 30, 30], seed=11)
    engine = engines(num_pages=16)  # 8 pages a prompt, 7 of them full: two prompts fit
    served = []
    for i in (0, 1, 0, 2, 1, 0):
        (result,) = _prefill(engine, [prompts[i]])
        served.append(result.num_cached)
        assert result.first.token_id == greedy_generate(model, prompts[i], 1)[0]
        assert engine.num_free_pages == 16
    # 0 hits its 7 full pages; 2 needs 6 more pages than are free and evicts six of 1's (least
    # recently used); 1 finds its first page and evicts six of 0's; 0 finds its first page.
    assert served == [0, 0, 28, 0, 4, 4]


# ---------------------------------------------------------------- through a live stack


def _generate(stub, request_id: str, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy token ids of a completion from ids, and its usage's cached tokens."""
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=4,
                                                            ignore_eos=True))  # fmt: skip
    chunks = list(stub.Generate(request, timeout=120))
    assert not any(c.HasField("error") for c in chunks), chunks
    tokens = [t for chunk in chunks for c in chunk.choices for t in c.token_ids]
    return tokens, chunks[-1].usage.cached_tokens


def _metric(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{sample} missing"
    return float(match.group(1))


def test_eviction_under_pressure_through_a_prefill_worker(tiny_checkpoint, model):
    """20 pages of 16 tokens; prompts of 120 tokens take 8 and leave 7 full ones cached, so the
    third distinct prompt already evicts. Every answer equals the single-process (uncached) one,
    and the cached counts follow the LRU order exactly."""
    stack = start_stack(tiny_checkpoint, num_pages=20)
    prompts = _prompts([120, 120, 120], seed=21)
    order = [0, 1, 0, 2, 1, 0, 2]
    try:
        with grpc.insecure_channel(router_address(stack)) as channel:
            stub = pb_grpc.RouterStub(channel)
            served = [_generate(stub, f"evict-{n}", prompts[i]) for n, i in enumerate(order)]
            workers = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest()).workers
        (prefill,) = [w for w in workers if w.role == "prefill"]
        with grpc.insecure_channel(prefill.address) as channel:
            status = pb_grpc.PrefillWorkerStub(channel).Status(pb.StatusRequest())
        time.sleep(1.5)  # a heartbeat carries the same numbers to the router's gauges
        metrics = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    finally:
        stack.stop()
    for (tokens, _), i in zip(served, order):
        assert tokens == greedy_generate(model, prompts[i], 4)
    # 0 and 1 fit; 0 hits its 7 full pages; 2 evicts two of 1's (least recently used); 1 finds
    # 5 and evicts two of 0's; 0 finds 5 and evicts two of 2's; 2 finds 5, evicts two of 1's.
    assert [cached for _, cached in served] == [0, 0, 112, 0, 80, 80, 80]
    assert (status.num_free_pages, status.num_total_pages, status.num_cached_pages) == (20, 20, 19)
    assert _metric(metrics, "kimiserve:cached_prompt_tokens_total") == 112 + 3 * 80
    assert _metric(metrics, "kimiserve:prompt_tokens_total") == 7 * 120
    assert _metric(metrics, 'kimiserve:pool_cached_pages{role="prefill"}') == 19
    assert _metric(metrics, 'kimiserve:pool_free_pages{role="prefill"}') == 20
