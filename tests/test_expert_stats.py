"""Expert-parallel phase timing and expert load statistics: neither switch changes outputs, the
counts sum to tokens x top_k per layer, and the router exports them as a monotonic counter."""

from __future__ import annotations

import asyncio
import random
import re
import time

import grpc
import torch
from stack_utils import free_port, router_address, start_stack

from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from router import metrics
from router.control import ControlServicer
from router.pools import Pool
from shared.model.expert_parallel import (
    EPContext,
    ExpertPlacement,
    create_ep_group,
    enable_expert_parallel,
)
from shared.model.expert_stats import enable_expert_stats
from shared.model.generate import greedy_generate
from shared.model.loader import load_text_model

PROMPT = [5, 17, 300, 2, 99, 1024, 7, 8, 640, 3, 11]
NUM_TOKENS = 6


def _hidden(model, num_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(num_tokens, model.config.hidden_size, generator=gen)


def test_stats_do_not_change_outputs_and_count_tokens_times_top_k(tiny_checkpoint):
    model = load_text_model(tiny_checkpoint)
    moe, x = model.layers[1].mlp, _hidden(model, 9)
    with torch.inference_mode():
        plain_out, plain_tokens = moe(x), greedy_generate(model, PROMPT, NUM_TOKENS)
    stats = enable_expert_stats(model)
    with torch.inference_mode():
        counted_out = moe(x)
        stats.counts.zero_()
        counted_tokens = greedy_generate(model, PROMPT, NUM_TOKENS)
    assert torch.equal(plain_out, counted_out)
    assert plain_tokens == counted_tokens

    text = model.config
    moe_layers = list(range(text.first_k_dense_replace, text.num_hidden_layers))
    assert stats.layer_ids == moe_layers
    processed = len(PROMPT) + NUM_TOKENS - 1  # the prompt, then one token per later step
    counts = stats.snapshot()
    assert [sum(row) for row in counts] == [processed * text.num_experts_per_tok] * len(counts)
    assert all(len(row) == text.n_routed_experts for row in counts)
    assert stats.flat() == [c for row in counts for c in row]


def test_phase_timing_does_not_change_outputs(tiny_checkpoint):
    model = load_text_model(tiny_checkpoint)
    moe, x = model.layers[1].mlp, _hidden(model, 9)
    with torch.inference_mode():
        reference = moe(x)
    group, keepalive = create_ep_group(f"127.0.0.1:{free_port()}", 0, 1, timeout_s=30)
    ctx = EPContext(group, 0, ExpertPlacement.round_robin(16, 1), keepalive=keepalive)
    enable_expert_parallel(model, ctx)
    with torch.inference_mode():
        untimed = moe(x)
        assert ctx.timing == {}
        ctx.time_phases = True
        timed = moe(x)
        moe(x[:0])  # an empty step is timed too
    assert torch.equal(untimed, timed)
    assert (timed - reference).abs().max().item() <= 1e-5
    assert set(ctx.timing) == {"dispatch", "expert", "combine"}
    assert all(seconds > 0 for seconds in ctx.timing.values())


def _load(layers: list[int], counts: list[int]) -> ctl.WorkerLoad:
    return ctl.WorkerLoad(expert_token_layers=layers, expert_tokens=counts)


def _totals(tokens: metrics.ExpertTokens) -> dict[tuple[str, str], float]:
    family = next(iter(tokens.collect()))
    return {(s.labels["layer"], s.labels["expert"]): s.value for s in family.samples}


def test_expert_tokens_sum_over_workers_and_never_decrease():
    tokens = metrics.ExpertTokens()
    assert list(tokens.collect()) == []  # nothing until a worker sends counts
    tokens.update("a", "h:1", _load([1, 2], [3, 0, 1, 4]))  # 2 layers x 2 experts
    tokens.update("b", "h:2", _load([1, 2], [1, 1, 0, 0]))
    tokens.update("b", "h:2", _load([1, 2], [2, 1, 0, 5]))  # later counts replace earlier ones
    assert _totals(tokens) == {("1", "0"): 5, ("1", "1"): 1, ("2", "0"): 1, ("2", "1"): 9}
    tokens.update("a", "h:1", _load([1, 2], [1, 0, 0, 0]))  # went down: a restarted process
    assert _totals(tokens)[("1", "0")] == 3 + 1 + 2
    tokens.update("b", "h:3", _load([1, 2], [9, 9, 9, 9]))  # same id, new address: new process
    assert _totals(tokens) == {("1", "0"): 3 + 1 + 2 + 9, ("1", "1"): 1 + 9,
                               ("2", "0"): 1 + 9, ("2", "1"): 4 + 5 + 9}  # fmt: skip
    tokens.update("c", "h:4", _load([1, 2], [1, 2, 3]))  # 3 counts for 2 layers: ignored
    tokens.update("c", "h:4", ctl.WorkerLoad(num_running=3))  # stats off: nothing
    assert ("1", "2") not in _totals(tokens)


def test_heartbeat_counts_reach_the_router_metric():
    async def beat() -> None:
        pools = {"decode": Pool("decode", pb_grpc.DecodeWorkerStub)}
        control = ControlServicer(pools)
        await control.Register(ctl.RegisterRequest(role="decode", worker_id="stats-test-0",
                                                   address="127.0.0.1:1"), None)  # fmt: skip
        load = _load([1, 2], [0] * 15 + [7] + [0] * 16)  # layer 1, expert 15: 7 tokens
        await control.Heartbeat(ctl.HeartbeatRequest(worker_id="stats-test-0", load=load), None)
        await control.Heartbeat(ctl.HeartbeatRequest(worker_id="unknown", load=load), None)

    asyncio.run(beat())
    text = metrics.render().decode()
    assert re.search(r'^kimiserve:expert_tokens_total\{expert="15",layer="1"\} 7\.0$', text, re.M)


def test_ep_stack_exports_decode_tokens_per_expert(tiny_checkpoint):
    """Two ranks, each counting its own requests: per layer, the router's sum is the decode
    steps times top_k (the first token of each request comes from prefill)."""
    num_requests, max_tokens, top_k = 4, 5, 4
    stack = start_stack(tiny_checkpoint, decode_ep_size=2, expert_stats=True)
    try:
        with grpc.insecure_channel(router_address(stack)) as channel:
            router, control = pb_grpc.RouterStub(channel), ctl_grpc.ControlStub(channel)
            rng = random.Random(0)
            for i in range(num_requests):
                request = pb.GenerateRequest(
                    request_id=f"stats-{i}", prompt_token_ids=rng.sample(range(1792), 9),
                    sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                               ignore_eos=True),
                )  # fmt: skip
                list(router.Generate(request))
            expected = num_requests * (max_tokens - 1) * top_k
            deadline = time.monotonic() + 20
            while (per_layer := _per_layer(control)) != {"1": expected, "2": expected}:
                assert time.monotonic() < deadline, per_layer
                time.sleep(0.5)
    finally:
        stack.stop()


def _per_layer(control) -> dict[str, int]:
    text = control.Metrics(ctl.MetricsRequest(), timeout=10).text.decode()
    totals: dict[str, int] = {}
    for layer, value in re.findall(r'^kimiserve:expert_tokens_total\{expert="\d+",layer="(\d+)"\} '
                                   r"([0-9.e+]+)$", text, re.M):  # fmt: skip
        totals[layer] = totals.get(layer, 0) + int(float(value))
    return totals
