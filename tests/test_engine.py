"""The fast engine paths: chunked prefill, batched decode attention, grouped experts, batched
sampling, and prefill feeding decode in one process; every engine test checks that the page
allocators end where they started."""

from __future__ import annotations

import random

import pytest
import torch

from decode_worker.colocated import ColocatedDriver
from decode_worker.engine import DecodeEngine, Request
from prefill_worker.engine import PrefillEngine, PrefillJob
from shared.attention import ForwardBatch, TorchAttentionBackend
from shared.kv_cache import KVCache, pages_needed, slots_for
from shared.model.generate import greedy_generate
from shared.model.layers import SwiGLU
from shared.model.loader import load_text_model
from shared.runner import ModelRunner
from shared.sampling import SamplingConfig, sample_batch, sample_one

PAGE_SIZE = 4
NUM_PAGES = 96
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_model(tiny_checkpoint)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1792, (n,), generator=gen).tolist() for n in lengths]


class _Runners:
    """Makes runners and checks, after the test, that each allocator has all its pages back."""

    def __init__(self, model) -> None:
        self.model = model
        self.made: list[ModelRunner] = []

    def __call__(self, num_pages: int = NUM_PAGES) -> ModelRunner:
        runner = ModelRunner(self.model, num_pages, PAGE_SIZE)
        self.made.append(runner)
        return runner


@pytest.fixture
def runners(model):
    made = _Runners(model)
    yield made
    for runner in made.made:
        allocator = runner.allocator
        assert allocator.num_free == allocator.num_pages, "pages leaked"


def _prefill(engine: PrefillEngine, prompts: list[list[int]]):
    jobs = [PrefillJob(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for job in jobs:
        engine.submit(job)
    while engine.has_work():
        assert engine.step() > 0
    return [job.future.result() for job in jobs]


# float32 matrix products round differently for different row counts (the BLAS picks kernels
# by shape), so a prompt run in chunks of 5 rows differs from one pass by a few ulps: up to
# 4e-6 on latents of magnitude 4 after three layers. A wrong position, mask or page would differ
# by more than 1e-2.
KV_ATOL = 1e-5


@pytest.mark.parametrize("chunk", [5, 16, 61])
def test_chunked_prefill_equals_one_shot(runners, chunk):
    prompts = _prompts([37, 3, 70, 16])
    one_shot = _prefill(PrefillEngine(runners(), max_prefill_chunk=100_000), prompts)
    chunked = _prefill(PrefillEngine(runners(), max_prefill_chunk=chunk), prompts)
    for prompt, whole, parts in zip(prompts, one_shot, chunked):
        assert parts.kv.shape == whole.kv.shape == (3, len(prompt), 40)
        torch.testing.assert_close(parts.kv, whole.kv, atol=KV_ATOL, rtol=0)
        assert parts.first.token_id == whole.first.token_id
        assert parts.first.logprob == pytest.approx(whole.first.logprob, abs=1e-5)


def test_chunked_prefill_spans_steps_within_its_budget(runners):
    engine = PrefillEngine(runners(), max_prefill_chunk=32)
    jobs = [PrefillJob(f"p{i}", p, GREEDY) for i, p in enumerate(_prompts([70, 10, 30]))]
    for job in jobs:
        engine.submit(job)
    ran = []
    while engine.has_work():
        ran.append(engine.step())
    assert ran == [32, 32, 32, 14]  # 70 + 10 + 30 tokens, 32 a step, in arrival order
    assert all(job.future.done() for job in jobs)


def test_prefill_engine_thread_serves_jobs(runners, model):
    engine = PrefillEngine(runners(), max_prefill_chunk=24)
    engine.start()
    prompts = _prompts([50, 9, 33], seed=3)
    futures = [engine.submit(PrefillJob(f"t{i}", p, GREEDY)) for i, p in enumerate(prompts)]
    for prompt, future in zip(prompts, futures):
        assert future.result(timeout=60).first.token_id == greedy_generate(model, prompt, 1)[0]
    with pytest.raises(ValueError, match="empty"):
        engine.submit(PrefillJob("empty", [], GREEDY))


def _colocated(runners, chunk: int, max_running: int = 256) -> ColocatedDriver:
    prefill = PrefillEngine(runners(), max_prefill_chunk=chunk)
    return ColocatedDriver(prefill, DecodeEngine(runners(), max_running=max_running))


def _request(request_id: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(request_id, prompt, GREEDY, max_tokens, frozenset(), [])


@pytest.mark.parametrize(("chunk", "max_running"), [(40, 256), (1000, 2)])
def test_colocated_greedy_equals_single_process(runners, model, chunk, max_running):
    """Chunked prefill, continuous batching (requests join and leave at different steps) and the
    batched decode attention give the single-process tokens."""
    driver = _colocated(runners, chunk, max_running)
    prompts = _prompts([13, 90, 4, 45, 31], seed=1)
    max_tokens = [9, 3, 12, 1, 7]
    requests = [_request(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, max_tokens))]
    for request in requests:
        driver.submit(request)
    driver.run_until_idle()
    for request, prompt, n in zip(requests, prompts, max_tokens):
        assert request.output_ids == greedy_generate(model, prompt, n), request.request_id
        events = [request.outputs.get_nowait() for _ in range(n + 1)]
        assert events[-1].finish_reason == "length"


def test_colocated_abort_while_prefilling_frees_pages(runners):
    driver = _colocated(runners, chunk=8)
    kept, dropped = _request("keep", _prompts([20])[0], 4), _request("drop", _prompts([30])[0], 4)
    driver.submit(kept)
    driver.submit(dropped)
    driver.step()  # both have started prefilling
    assert driver.decode.abort("drop")
    driver.run_until_idle()
    assert len(kept.output_ids) == 4 and dropped.output_ids == []
    finish = [dropped.outputs.get_nowait() for _ in range(dropped.outputs.qsize())]
    assert [e.finish_reason for e in finish] == ["abort"]


def _reference_attention(q_lat, q_pe, ckv, kpe, scale):
    scores = (q_lat @ ckv.T + q_pe @ kpe.T) * scale  # [H, S]
    return scores.softmax(-1) @ ckv  # [H, r]


@pytest.mark.parametrize("seed", range(3))
def test_batched_decode_attention_equals_per_sequence(seed):
    class _Cfg:
        num_hidden_layers, kv_lora_rank, qk_rope_head_dim = 1, 32, 8

    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    cache = KVCache(_Cfg, 80, PAGE_SIZE, torch.float32, "cpu")
    free = list(range(80))
    rng.shuffle(free)
    seqs = []
    for _ in range(6):  # lengths differ, so page tables are padded to the longest
        kv_len = rng.randint(1, 45)
        pages = [free.pop() for _ in range(pages_needed(kv_len, PAGE_SIZE))]
        ckv, kpe = torch.randn(kv_len, 32, generator=gen), torch.randn(kv_len, 8, generator=gen)
        cache.write(0, slots_for(pages, 0, kv_len, PAGE_SIZE), ckv, kpe)
        seqs.append((kv_len, pages, ckv, kpe))
    q_lat, q_pe = torch.randn(6, 3, 32, generator=gen), torch.randn(6, 3, 8, generator=gen)
    batch = ForwardBatch(
        input_ids=torch.zeros(6, dtype=torch.long),
        positions=torch.tensor([s[0] - 1 for s in seqs]),
        slots=torch.zeros(6, dtype=torch.long),
        q_lens=[1] * 6,
        kv_lens=[s[0] for s in seqs],
        page_tables=[s[1] for s in seqs],
    )
    assert batch.is_decode
    out = TorchAttentionBackend(cache, softmax_scale=0.2).forward(0, q_lat, q_pe, batch)
    for i, (_, _, ckv, kpe) in enumerate(seqs):
        ref = _reference_attention(q_lat[i], q_pe[i], ckv, kpe, 0.2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_prefill_attention_in_query_blocks_equals_full_causal():
    """Long chunks (several query blocks) after cached tokens, beside a short one."""

    class _Cfg:
        num_hidden_layers, kv_lora_rank, qk_rope_head_dim = 1, 32, 8

    gen = torch.Generator().manual_seed(4)
    cache = KVCache(_Cfg, 200, PAGE_SIZE, torch.float32, "cpu")
    backend = TorchAttentionBackend(cache, softmax_scale=0.2)
    seqs, next_page = [], 0
    for q_len, kv_len in [(300, 350), (3, 3), (2 * backend.QUERY_BLOCK, 2 * backend.QUERY_BLOCK)]:
        pages = list(range(next_page, next_page + pages_needed(kv_len, PAGE_SIZE)))
        next_page += len(pages)
        ckv, kpe = torch.randn(kv_len, 32, generator=gen), torch.randn(kv_len, 8, generator=gen)
        cache.write(0, slots_for(pages, 0, kv_len, PAGE_SIZE), ckv, kpe)
        seqs.append((q_len, kv_len, pages, ckv, kpe))
    total = sum(s[0] for s in seqs)
    q_lat, q_pe = torch.randn(total, 3, 32, generator=gen), torch.randn(total, 3, 8, generator=gen)
    batch = ForwardBatch(
        input_ids=torch.zeros(total, dtype=torch.long),
        positions=torch.zeros(total, dtype=torch.long),
        slots=torch.zeros(total, dtype=torch.long),
        q_lens=[s[0] for s in seqs],
        kv_lens=[s[1] for s in seqs],
        page_tables=[s[2] for s in seqs],
    )
    out = backend.forward(0, q_lat, q_pe, batch)
    start = 0
    for q_len, kv_len, _, ckv, kpe in seqs:
        for i in range(q_len):
            visible = kv_len - q_len + i + 1
            ref = _reference_attention(q_lat[start + i], q_pe[start + i], ckv[:visible],
                                       kpe[:visible], 0.2)  # fmt: skip
            torch.testing.assert_close(out[start + i], ref, atol=1e-5, rtol=1e-5)
        start += q_len


def _naive_routed(moe, x, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            expert: SwiGLU = moe.experts[int(ids[t, k])]
            out[t] += weights[t, k] * expert(x[t : t + 1])[0]
    return out


@torch.inference_mode()
def test_grouped_experts_equal_one_expert_at_a_time(model):
    moe = model.layers[1].mlp
    x = torch.randn(23, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, weights = moe.gate(x)
    torch.testing.assert_close(moe.routed(x, ids, weights), _naive_routed(moe, x, ids, weights),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # The experts' weights are views of the stacks: an in-place change reaches both.
    w13, _ = moe._stacked_weights()
    up = moe.experts[3].up_proj
    assert up.weight.data_ptr() == w13[3, up.out_features :].data_ptr()


def test_grouped_experts_follow_replaced_parameters(model):
    moe = model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        before = moe.routed(x, ids, weights)
    expert = moe.experts[int(ids[0, 0])]
    original = expert.down_proj.weight
    try:
        expert.down_proj.weight = torch.nn.Parameter(original * 2, requires_grad=False)
        with torch.inference_mode():
            after = moe.routed(x, ids, weights)
        assert not torch.allclose(before[0], after[0])
        torch.testing.assert_close(after, _naive_routed(moe, x, ids, weights), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    finally:
        expert.down_proj.weight = original


def test_sample_batch_equals_sample_one_row_by_row():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    configs = [
        GREEDY,
        SamplingConfig(temperature=0.0, top_logprobs=3),
        SamplingConfig(temperature=0.0, repetition_penalty=1.3),
        SamplingConfig(temperature=0.8, top_p=0.9, seed=5),
        GREEDY,
        SamplingConfig(temperature=1.0, top_k=20, seed=9, frequency_penalty=0.5),
    ]
    steps = [0, 3, 1, 7, 2, 4]
    prompts = [[1, 2], [3], [int(logits[2].argmax()), 5], [], [9], [10, 11]]
    outputs = [[], [4], [6], [8, 8], [], [int(logits[5].argmax())]]
    got = sample_batch(logits, configs, steps, prompts, outputs)
    for i, cfg in enumerate(configs):
        assert got[i] == sample_one(logits[i], cfg, steps[i], prompts[i], outputs[i]), i


def test_bench_size_changes_only_sizes():
    from shared.checkpoint import TEXT_CONFIG, build_config

    token_ids = {"vocab_size": TEXT_CONFIG["vocab_size"], "bos_token_id": 1, "eos_token_id": 2,
                 "pad_token_id": 3, "media_placeholder_token_id": 4}  # fmt: skip
    tiny, bench = build_config(token_ids)["text_config"], build_config(token_ids, "bench")
    bench = bench["text_config"]
    assert bench["hidden_size"] > tiny["hidden_size"]
    assert bench["n_routed_experts"] > tiny["n_routed_experts"]
    same = {"vocab_size", "scoring_func", "topk_method", "rope_scaling", "first_k_dense_replace"}
    assert all(bench[key] == tiny[key] for key in same)
    with pytest.raises(ValueError, match="unknown checkpoint size"):
        build_config(token_ids, "huge")
