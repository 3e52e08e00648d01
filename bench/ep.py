"""Expert-parallel decode benchmark: where a decode step's time goes at EP sizes 1, 2 and 4.

Per checkpoint (the tiny one and the larger "bench" size, both from
`shared.checkpoint.make_tiny_checkpoint`), float32 on the CPU. Each EP size runs that many real
processes, one torch thread each, joined by a gloo group over 127.0.0.1 (`create_ep_group`),
experts placed round robin. The workload is fixed: 32 sequences of 64 random prompt tokens,
split evenly over the ranks (attention is data-parallel), prefilled once, then 3 warm-up and 32
measured greedy decode steps, every rank stepping together.

A step's time is split into attention (forward hooks on every attention module), the three
phases of `ep_routed` (`EPContext.time_phases`: dispatch = routing, the count exchange and the
two all_to_alls out; expert = the owned experts; combine = the all_to_all back and the weighted
sum) and other (embedding, norms, the dense layer, gate, shared expert, LM head, argmax).
Figures are means over the measured steps and over the ranks; a collective waits for the
slowest rank, so waiting shows up in dispatch and combine. The row "no EP" is the same workload
in one process on the plain `MoE.routed` path, for the cost of the EP machinery at one rank.

    python -m bench.ep [--sizes tiny,bench] [--ep-sizes 1,2,4] [--steps 32]

Prints a table and writes `bench/results/ep.json`. With 4 ranks on a 2-core machine the ranks
share cores, so absolute times at EP 4 measure oversubscription as much as EP.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.checkpoint import NUM_BASE_TOKENS, make_tiny_checkpoint
from shared.config import ModelConfig
from shared.model.expert_parallel import (
    EPContext,
    ExpertPlacement,
    create_ep_group,
    enable_expert_parallel,
)
from shared.model.loader import load_text_model
from shared.runner import ModelRunner, SeqStep

NUM_SEQS = 32
PROMPT_LEN = 64
WARMUP_STEPS = 3
PAGE_SIZE = 16
PHASES = ("attention", "dispatch", "expert", "combine")
RESULTS = Path(__file__).parent / "results" / "ep.json"


def make_prompts(num_seqs: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_BASE_TOKENS, (num_seqs, length), generator=gen).tolist()


class DecodeBatch:
    """Sequences prefilled together on one runner, then decoded greedily one token a step."""

    def __init__(self, model, prompts: list[list[int]], max_steps: int) -> None:
        max_tokens = max((len(p) for p in prompts), default=0) + max_steps + 1
        num_pages = len(prompts) * -(-max_tokens // PAGE_SIZE) + 1
        self.runner = ModelRunner(model, num_pages, PAGE_SIZE)
        self.prompts = prompts
        self.tables: list[list[int]] = [[] for _ in prompts]
        for table, prompt in zip(self.tables, prompts):
            self.runner.ensure_pages(table, len(prompt))
        logits = self.runner.run([SeqStep(p, 0, t) for p, t in zip(prompts, self.tables)])
        self.outputs = [[token] for token in logits.argmax(-1).tolist()]

    def step(self) -> None:
        steps = []
        for prompt, table, out in zip(self.prompts, self.tables, self.outputs):
            cached = len(prompt) + len(out) - 1
            self.runner.ensure_pages(table, cached + 1)
            steps.append(SeqStep([out[-1]], cached, table))
        logits = self.runner.run(steps)  # [B, V]; an empty batch is an idle rank's step
        for out, token in zip(self.outputs, logits.argmax(-1).tolist()):
            out.append(token)


class AttentionClock:
    """Seconds spent inside the attention modules, from forward hooks."""

    def __init__(self, model) -> None:
        self.seconds = 0.0
        self._start = 0.0
        for layer in model.layers:
            layer.self_attn.register_forward_pre_hook(self._enter)
            layer.self_attn.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start


def run_rank(model, ctx: EPContext | None, prompts: list[list[int]], num_steps: int) -> dict:
    """The decode workload on this rank; per-step milliseconds of each phase, and the tokens."""
    clock = AttentionClock(model)
    batch = DecodeBatch(model, prompts, WARMUP_STEPS + num_steps)
    step_seconds = []
    for step in range(WARMUP_STEPS + num_steps):
        if step == WARMUP_STEPS:
            clock.seconds = 0.0
            if ctx is not None:
                ctx.timing.clear()
        start = time.perf_counter()
        batch.step()
        step_seconds.append(time.perf_counter() - start)
    seconds = {"attention": clock.seconds, **(ctx.timing if ctx is not None else {})}
    ms = {phase: 1000 * seconds.get(phase, 0.0) / num_steps for phase in PHASES}
    step_ms = 1000 * statistics.fmean(step_seconds[WARMUP_STEPS:])
    return {"step_ms": step_ms, **ms, "other": step_ms - sum(ms.values()),
            "tokens": batch.outputs}  # fmt: skip


def _rank_main(model_dir: str, rank: int, size: int, rendezvous: str, num_steps: int,
               out_path: str) -> None:  # fmt: skip
    """One process of a run; `size` 0 is the "no EP" baseline."""
    torch.set_num_threads(1)
    ctx, owned = None, None
    if size:
        num_experts = ModelConfig.from_dir(model_dir).text.n_routed_experts
        placement = ExpertPlacement.round_robin(num_experts, size)
        owned = placement.local_experts(rank)
    model = load_text_model(model_dir, owned_experts=owned)
    if size:
        group, keepalive = create_ep_group(rendezvous, rank, size, timeout_s=300)
        ctx = EPContext(group, rank, placement, time_phases=True, keepalive=keepalive)
        enable_expert_parallel(model, ctx)
    prompts = _share(make_prompts(NUM_SEQS, PROMPT_LEN), rank, max(size, 1))
    with torch.inference_mode():
        result = run_rank(model, ctx, prompts, num_steps)
    Path(out_path).write_text(json.dumps(result))


def _share(prompts: list[list[int]], rank: int, size: int) -> list[list[int]]:
    """This rank's contiguous share of the sequences."""
    per_rank = -(-len(prompts) // size)
    return prompts[rank * per_rank : (rank + 1) * per_rank]


def run_size(model_dir: Path, size: int, num_steps: int, work_dir: Path) -> list[dict]:
    """Runs `size` rank processes (one for size 0) and returns each rank's result."""
    spawn = mp.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        rendezvous = f"127.0.0.1:{probe.getsockname()[1]}"
    outs = [work_dir / f"size{size}-rank{r}.json" for r in range(max(size, 1))]
    procs = [spawn.Process(target=_rank_main, args=(str(model_dir), r, size, rendezvous,
                                                    num_steps, str(out))) for r, out in enumerate(outs)]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(900)
        assert proc.exitcode == 0, f"a rank of EP size {size} failed ({proc.exitcode})"
    return [json.loads(out.read_text()) for out in outs]


def summarize(ranks: list[dict], baseline_tokens: list[list[int]] | None) -> dict:
    keys = ("step_ms", *PHASES, "other")
    mean = {key: statistics.fmean(r[key] for r in ranks) for key in keys}
    tokens = [seq for r in ranks for seq in r["tokens"]]
    return {
        **mean,
        "percent": {key: 100 * mean[key] / mean["step_ms"] for key in (*PHASES, "other")},
        "per_rank": [{key: r[key] for key in keys} for r in ranks],
        "tokens_identical_to_no_ep": None if baseline_tokens is None else tokens == baseline_tokens,
        "tokens": tokens,
    }


def bench_checkpoint(size_name: str, root: Path, ep_sizes: list[int], num_steps: int) -> dict:
    model_dir = make_tiny_checkpoint(root / size_name, seed=0, size=size_name)
    text = ModelConfig.from_dir(model_dir).text
    rows = {"no EP": summarize(run_size(model_dir, 0, num_steps, root), None)}
    baseline = rows["no EP"]["tokens"]
    for ep_size in ep_sizes:
        rows[str(ep_size)] = summarize(run_size(model_dir, ep_size, num_steps, root), baseline)
    for row in rows.values():
        del row["tokens"]
    config_keys = ("hidden_size", "num_hidden_layers", "first_k_dense_replace",
                   "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")  # fmt: skip
    return {"config": {key: getattr(text, key) for key in config_keys}, "ep_sizes": rows}


def print_table(results: dict[str, dict]) -> None:
    columns = [("checkpoint", 11), ("EP", 7), ("step ms", 9)] + [(p, 16) for p in PHASES] + [
        ("other", 16), ("same tokens", 12)]  # fmt: skip
    header = "".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for size_name, result in results.items():
        for ep, row in result["ep_sizes"].items():
            split = [f"{row[k]:.2f} ({row['percent'][k]:4.1f}%)" for k in (*PHASES, "other")]
            if ep == "no EP":  # no EP phases: "other" includes the routed experts
                split[1:4] = ["-"] * 3
            same = row["tokens_identical_to_no_ep"]
            cells = [size_name, ep, f"{row['step_ms']:.2f}", *split, "-" if same is None else same]
            print("".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, columns)))
    print(f"\nmeans per decode step and rank; {NUM_SEQS} sequences split over the ranks, "
          f"{PROMPT_LEN}-token prompts, float32, one torch thread per rank, gloo on 127.0.0.1")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve expert-parallel decode benchmark")
    parser.add_argument("--sizes", default="tiny,bench")
    parser.add_argument("--ep-sizes", default="1,2,4")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    ep_sizes = [int(s) for s in args.ep_sizes.split(",")]
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kimiserve-bench-ep-") as root:
        for size_name in args.sizes.split(","):
            results[size_name] = bench_checkpoint(size_name, Path(root), ep_sizes, args.steps)
    print_table(results)
    report = {
        "workload": {
            "num_seqs": NUM_SEQS,
            "prompt_len": PROMPT_LEN,
            "warmup_steps": WARMUP_STEPS,
            "steps": args.steps,
            "dtype": "float32",
            "threads_per_rank": 1,
            "placement": "round robin",
            "backend": "gloo",
        },  # fmt: skip
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "num_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },  # fmt: skip
        "checkpoints": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
