"""Expert load benchmark: how evenly each MoE layer spreads its tokens over the experts.

Runs the `bench.ep` workload (32 sequences of 64 random prompt tokens, prefilled together, then
32 greedy decode steps) through one model in one process with expert statistics on
(`enable_expert_stats`), for the tiny and the "bench" checkpoint. Per MoE layer and phase
(prefill, decode) it reports the imbalance, max over mean tokens per expert (1.0 is perfectly
even; the hottest expert sets the pace of expert parallelism), min over mean, and the same
max over mean per rank for round-robin placement over 2 and 4 ranks.

The checkpoints have random weights and the prompts are random tokens, so these figures show
the tool, not Kimi-K2.5's real expert load; run it on real traffic through a worker with
`--expert-stats` (`kimiserve:expert_tokens_total`) for that.

    python -m bench.expert_load [--sizes tiny,bench] [--steps 32]

Prints a table and writes `bench/results/expert_load.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.ep import NUM_SEQS, PROMPT_LEN, DecodeBatch, make_prompts
from shared.checkpoint import make_tiny_checkpoint
from shared.model.expert_parallel import ExpertPlacement
from shared.model.expert_stats import enable_expert_stats
from shared.model.loader import load_text_model

EP_SIZES = (2, 4)
RESULTS = Path(__file__).parent / "results" / "expert_load.json"


def layer_summary(counts: list[int], top_k: int) -> dict:
    """Balance figures of one layer's tokens per expert."""
    mean = sum(counts) / len(counts)
    ranks = {}
    for size in EP_SIZES:
        owner = ExpertPlacement.round_robin(len(counts), size).owner
        per_rank = [sum(c for c, r in zip(counts, owner) if r == rank) for rank in range(size)]
        ranks[str(size)] = max(per_rank) / (sum(per_rank) / size)
    return {
        "tokens": sum(counts) // top_k,
        "max_over_mean": max(counts) / mean,
        "min_over_mean": min(counts) / mean,
        "hottest_expert": counts.index(max(counts)),
        "rank_max_over_mean": ranks,
        "counts": counts,
    }


def bench_checkpoint(size_name: str, root: Path, num_steps: int) -> dict:
    model_dir = make_tiny_checkpoint(root / size_name, seed=0, size=size_name)
    model = load_text_model(model_dir)
    stats = enable_expert_stats(model)
    top_k = model.config.num_experts_per_tok
    with torch.inference_mode():
        batch = DecodeBatch(model, make_prompts(NUM_SEQS, PROMPT_LEN), num_steps)
        prefill = stats.snapshot()
        for _ in range(num_steps):
            batch.step()
        total = stats.snapshot()
    decode = [[t - p for t, p in zip(trow, prow)] for trow, prow in zip(total, prefill)]
    layers = {}
    for layer, prefill_row, decode_row in zip(stats.layer_ids, prefill, decode):
        layers[str(layer)] = {"prefill": layer_summary(prefill_row, top_k),
                              "decode": layer_summary(decode_row, top_k)}  # fmt: skip
    return {"n_routed_experts": model.config.n_routed_experts, "top_k": top_k, "layers": layers}


def print_table(results: dict[str, dict]) -> None:
    columns = [("checkpoint", 11), ("layer", 6), ("phase", 8), ("tokens", 8), ("max/mean", 9),
               ("min/mean", 9), ("hottest", 8)] + [(f"EP{n} max/mean", 13) for n in EP_SIZES]  # fmt: skip
    header = "".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for size_name, result in results.items():
        for layer, phases in result["layers"].items():
            for phase, s in phases.items():
                cells = [size_name, layer, phase, s["tokens"], f"{s['max_over_mean']:.2f}",
                         f"{s['min_over_mean']:.2f}", s["hottest_expert"],
                         *(f"{s['rank_max_over_mean'][str(n)]:.2f}" for n in EP_SIZES)]  # fmt: skip
                print("".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, columns)))
    print("\nmax/mean: tokens of the busiest expert over the mean per expert (1.00 = even); "
          "EPn: the same per rank, round-robin placement; random weights and prompts")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve expert load benchmark")
    parser.add_argument("--sizes", default="tiny,bench")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kimiserve-bench-load-") as root:
        for size_name in args.sizes.split(","):
            results[size_name] = bench_checkpoint(size_name, Path(root), args.steps)
    print_table(results)
    report = {
        "workload": {
            "num_seqs": NUM_SEQS,
            "prompt_len": PROMPT_LEN,
            "decode_steps": args.steps,
            "weights": "random (seed 0)",
            "prompts": "random tokens",
        },  # fmt: skip
        "checkpoints": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
