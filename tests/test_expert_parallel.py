"""Expert-parallel MoE across real processes (gloo): equals the single-rank layer, also with
phase timing and expert counting switched on."""

from __future__ import annotations

import multiprocessing as mp
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stack_utils import free_port

from shared.model.expert_parallel import (
    EPContext,
    ExpertPlacement,
    create_ep_group,
    enable_expert_parallel,
)
from shared.model.expert_stats import enable_expert_stats
from shared.model.loader import load_text_model

LAYER = 1  # the first MoE layer
TOKENS_PER_RANK = [7, 0, 13, 5]  # a rank with no tokens still takes part


def _inputs(rank: int, hidden: int) -> torch.Tensor:
    return torch.randn(TOKENS_PER_RANK[rank], hidden, generator=torch.Generator().manual_seed(rank))


def _rank_main(model_dir: str, rank: int, size: int, owner: list[int], rendezvous: str,
               out_dir: str, switches: bool) -> None:  # fmt: skip
    torch.set_num_threads(1)
    placement = ExpertPlacement(tuple(owner), size)
    model = load_text_model(model_dir, owned_experts=placement.local_experts(rank))
    group, keepalive = create_ep_group(rendezvous, rank, size, timeout_s=60)
    ctx = EPContext(group, rank, placement, time_phases=switches, keepalive=keepalive)
    enable_expert_parallel(model, ctx)
    stats = enable_expert_stats(model) if switches else None
    moe = model.layers[LAYER].mlp
    with torch.inference_mode():
        out = moe(_inputs(rank, model.config.hidden_size))
    assert set(ctx.timing) == ({"dispatch", "expert", "combine"} if switches else set())
    counts = {"counts": stats.counts[stats.layer_ids.index(LAYER)].clone()} if switches else {}
    save_file({"out": out.contiguous(), **counts}, f"{out_dir}/rank{rank}.safetensors")


def _run_ranks(model_dir: Path, size: int, owner: list[int], out_dir: Path,
               switches: bool) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    ctx = mp.get_context("spawn")
    rendezvous = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(str(model_dir), r, size, owner, rendezvous,
                                                  str(out_dir), switches)) for r in range(size)]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
        assert proc.exitcode == 0
    return [load_file(out_dir / f"rank{r}.safetensors") for r in range(size)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = load_text_model(tiny_checkpoint)
    moe = model.layers[LAYER].mlp
    with torch.inference_mode():
        return [moe(_inputs(r, model.config.hidden_size)) for r in range(4)]


@pytest.mark.parametrize("size,shuffled", [(2, False), (4, False), (4, True)])
def test_expert_parallel_moe_equals_one_rank(tiny_checkpoint, reference, tmp_path, size, shuffled):
    num_experts = 16
    owner = list(ExpertPlacement.round_robin(num_experts, size).owner)
    if shuffled:  # a non-contiguous, uneven table
        random.Random(0).shuffle(owner)
        owner[owner.index(1)] = 0
    results = _run_ranks(tiny_checkpoint, size, owner, tmp_path, switches=shuffled)
    for rank in range(size):
        out = results[rank]["out"]
        assert out.shape == reference[rank].shape
        diff = (out - reference[rank]).abs()
        assert diff.numel() == 0 or diff.max().item() <= 1e-5
        if shuffled:  # timing and counting were on: each rank counted its own tokens x top_k
            assert int(results[rank]["counts"].sum()) == TOKENS_PER_RANK[rank] * 4


def test_placement_table_is_checked():
    with pytest.raises(AssertionError, match="owns no expert"):
        ExpertPlacement((0, 0, 0, 0), 2).check(4)
    assert ExpertPlacement.round_robin(5, 2).local_experts(1) == [1, 3]
