"""Engine benchmark: our prefill and decode engines against transformers' `generate`.

Per checkpoint (the tiny one and the larger "bench" size of the same architecture, both made by
`shared.checkpoint.make_tiny_checkpoint`), float32 on the CPU, the same workload for both sides:
32 prompts of 64-512 random tokens, 128 greedy output tokens each, no stop tokens.

- ours: the product engines in one process (`decode_worker.colocated.ColocatedDriver`): every
  request is reserved on a `DecodeEngine`, prefilled in batched, chunked steps by a
  `PrefillEngine` with its own cache, its latents written into the decode pages, then decoded
  by continuous batching; all 32 requests are submitted at once.
- transformers: `Kimi_K25ForConditionalGeneration.generate(do_sample=False)` one prompt at a
  time (batch 1), as users typically call it, with its default attention (sdpa) and experts
  (grouped_mm) implementations.

Output tokens/s is 32 * 128 over the wall time from the first submission to the last token,
prefill included. Each side runs `--runs` times after one warm-up request; the table shows
medians. The tokens of every prompt are compared between the two sides. KV bytes per token: ours
is `KVCache.bytes_per_token()`; transformers' is what its `DynamicCache` holds after a
generation divided by the number of tokens in it.

    python -m bench.engine [--sizes tiny,bench] [--runs 3] [--threads 2] [--device cuda]
        [--num-prompts 32] [--output-len 128] [--out bench/results/engine.json]

Prints a table and writes `bench/results/engine.json`. Needs `transformers` (a test
dependency). Peak memory is about 2 GB; the default run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from decode_worker.colocated import ColocatedDriver
from decode_worker.engine import DecodeEngine, Request
from prefill_worker.engine import PrefillEngine
from shared.checkpoint import NUM_BASE_TOKENS, make_tiny_checkpoint
from shared.model.loader import load_text_model
from shared.model.text import KimiTextModel
from shared.runner import ModelRunner
from shared.sampling import SamplingConfig

NUM_PROMPTS = 32
MIN_PROMPT, MAX_PROMPT = 64, 512
NUM_OUTPUT = 128
PAGE_SIZE = 16
RESULTS = Path(__file__).parent / "results" / "engine.json"


def make_prompts(seed: int = 0, num_prompts: int = NUM_PROMPTS) -> list[list[int]]:
    """Random plain-token prompts (no special ids), lengths uniform in [64, 512]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (num_prompts,), generator=gen).tolist()
    return [torch.randint(0, NUM_BASE_TOKENS, (n,), generator=gen).tolist() for n in lengths]


# ---------------------------------------------------------------- ours


class Clock:
    """Wall and CPU (this process, all threads) seconds since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def ours_generate(
    model: KimiTextModel, prompts: list[list[int]], num_output: int, device: str = "cpu"
) -> tuple[list[list[int]], tuple[float, float], int]:
    """All prompts through fresh engines; returns tokens, (wall, CPU) seconds and KV bytes per
    token."""
    max_tokens = max(len(p) for p in prompts) + num_output
    num_pages = len(prompts) * -(-max_tokens // PAGE_SIZE) + 8
    prefill = PrefillEngine(ModelRunner(model, num_pages, PAGE_SIZE, device))
    decode = DecodeEngine(ModelRunner(model, num_pages, PAGE_SIZE, device))
    driver = ColocatedDriver(prefill, decode)
    greedy = SamplingConfig(temperature=0.0)
    requests = [
        Request(f"bench-{i}", prompt, greedy, num_output, frozenset(), [])
        for i, prompt in enumerate(prompts)
    ]
    clock = Clock()
    for request in requests:
        driver.submit(request)
    driver.run_until_idle()
    seconds = clock.stop()
    for runner in (prefill.runner, decode.runner):
        assert runner.allocator.num_free == num_pages, "the engines leaked pages"
    return [r.output_ids for r in requests], seconds, decode.runner.cache.bytes_per_token()


# ---------------------------------------------------------------- transformers


def load_transformers(model_dir: Path, work_dir: Path) -> Any:
    from transformers import Kimi_K25ForConditionalGeneration

    from tests.hf_reference import translate_checkpoint

    hf_dir = translate_checkpoint(model_dir, work_dir)
    model = Kimi_K25ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # no stop token: always max_new_tokens tokens
    model.generation_config.pad_token_id = model.config.pad_token_id
    # Without images, transformers embeds the media placeholder as token 0; random weights
    # generate the placeholder now and then, and we (rightly) embed it as itself. No prompt
    # here has an image, so the placeholder is made an ordinary token on this side too.
    for config in (model.config, model.model.config):
        config.image_token_id = -1
    return model.eval()


def transformers_generate(
    model: Any, prompts: list[list[int]], num_output: int
) -> tuple[list[list[int]], tuple[float, float], float]:
    """One `generate` call per prompt; returns tokens, (wall, CPU) seconds and KV bytes per
    token."""
    outputs, kv_bytes_per_token = [], 0.0
    clock = Clock()
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        result = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=num_output,
            do_sample=False,
            return_dict_in_generate=True,
        )
        outputs.append(result.sequences[0, len(prompt) :].tolist())
        kv_bytes_per_token = cache_bytes_per_token(result.cache)
    return outputs, clock.stop(), kv_bytes_per_token


def cache_bytes_per_token(cache: Any) -> float:
    """Bytes every layer of a `DynamicCache` holds, divided by the tokens it holds."""
    num_bytes = 0
    for layer in cache.layers:
        num_bytes += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return num_bytes / cache.get_seq_length()


# ---------------------------------------------------------------- driver


def bench_checkpoint(
    size: str,
    root: Path,
    prompts: list[list[int]],
    runs: int,
    device: str = "cpu",
    num_output: int = NUM_OUTPUT,
) -> dict:
    model_dir = make_tiny_checkpoint(root / size, seed=0, size=size)
    ours_model = load_text_model(model_dir, dtype=torch.float32, device=device)
    text = ours_model.config
    hf_model = load_transformers(model_dir, root / f"{size}-hf").to(device)
    warm = [prompts[0][:MIN_PROMPT]]
    ours_generate(ours_model, warm, 4, device)
    transformers_generate(hf_model, warm, 4)

    ours_runs, hf_runs = [], []  # (wall, CPU) seconds per run
    ours_tokens = hf_tokens = None
    for _ in range(runs):
        tokens, seconds, ours_kv = ours_generate(ours_model, prompts, num_output, device)
        assert ours_tokens in (None, tokens), "our tokens changed between runs"
        ours_tokens = tokens
        ours_runs.append(seconds)
        tokens, seconds, hf_kv = transformers_generate(hf_model, prompts, num_output)
        assert hf_tokens in (None, tokens), "transformers' tokens changed between runs"
        hf_tokens = tokens
        hf_runs.append(seconds)
        print(f"{size} run {len(hf_runs)}/{runs}: ours {ours_runs[-1][0]:.1f} s, transformers "
              f"{seconds[0]:.1f} s (wall)", file=sys.stderr, flush=True)  # fmt: skip
    expected_kv = text.num_hidden_layers * text.kv_cache_dim * torch.float32.itemsize
    assert ours_kv == expected_kv, (ours_kv, expected_kv)

    same = [a == b for a, b in zip(ours_tokens, hf_tokens)]
    num_tokens = len(prompts) * num_output
    ours_median, hf_median = (
        _median_rate(ours_runs, 0, num_tokens),
        _median_rate(hf_runs, 0, num_tokens),
    )
    return {
        "config": {
            key: getattr(text, key)
            for key in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_rope_head_dim",
                "n_routed_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "intermediate_size",
            )
        },  # fmt: skip
        "num_parameters": sum(p.numel() for p in ours_model.parameters()),
        "ours_tokens_per_s": ours_median,
        "transformers_tokens_per_s": hf_median,
        "ratio": ours_median / hf_median,
        # Output tokens per CPU-second of this process: less sensitive to other load.
        "ours_tokens_per_cpu_s": _median_rate(ours_runs, 1, num_tokens),
        "transformers_tokens_per_cpu_s": _median_rate(hf_runs, 1, num_tokens),
        "ours_runs_wall_cpu_s": ours_runs,
        "transformers_runs_wall_cpu_s": hf_runs,
        "tokens_identical": all(same),
        "num_prompts_identical": sum(same),
        "first_difference": _first_difference(ours_tokens, hf_tokens),
        "kv_bytes_per_token": {"ours": ours_kv, "transformers": hf_kv},
        "transformers_implementations": {
            "attention": hf_model.config.text_config._attn_implementation,
            "experts": hf_model.config.text_config._experts_implementation,
        },
    }


def _median_rate(runs: list[tuple[float, float]], which: int, num_tokens: int) -> float:
    return num_tokens / statistics.median(run[which] for run in runs)


def _first_difference(ours: list[list[int]], theirs: list[list[int]]) -> dict | None:
    for prompt, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            position = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            return {"prompt": prompt, "position": position}
    return None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def print_table(results: dict[str, dict], num_prompts: int, num_output: int) -> None:
    columns = [("checkpoint", 11), ("ours tok/s", 11), ("HF tok/s", 10), ("ratio", 7),
               ("ratio/CPU-s", 12), ("identical", 10), ("KV B/tok ours", 14), ("HF", 7)]  # fmt: skip
    header = "".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for size, r in results.items():
        cpu_ratio = r["ours_tokens_per_cpu_s"] / r["transformers_tokens_per_cpu_s"]
        kv = r["kv_bytes_per_token"]
        cells = [size, f"{r['ours_tokens_per_s']:.1f}", f"{r['transformers_tokens_per_s']:.1f}",
                 f"{r['ratio']:.1f}x", f"{cpu_ratio:.1f}x", str(r["tokens_identical"]),
                 f"{kv['ours']:,}", f"{kv['transformers']:,.0f}"]  # fmt: skip
        print("".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)))
    print(f"\nmedians; {num_prompts} prompts of {MIN_PROMPT}-{MAX_PROMPT} tokens, {num_output} "
          "greedy tokens each, float32; transformers: generate() one prompt at a time")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve engine benchmark")
    parser.add_argument("--sizes", default="tiny,bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    # "cuda": both sides on the GPU, still float32 (so our attention runs the PyTorch backend:
    # FlashInfer needs bf16); bench/gpu_check.sh runs it so, into its own results folder.
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)  # smaller: dry runs
    parser.add_argument("--output-len", type=int, default=NUM_OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    prompts = make_prompts(num_prompts=args.num_prompts)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kimiserve-bench-") as root:
        for size in args.sizes.split(","):
            results[size] = bench_checkpoint(
                size, Path(root), prompts, args.runs, args.device, args.output_len
            )
    print_table(results, args.num_prompts, args.output_len)
    gpu_name = torch.cuda.get_device_name(args.device) if args.device != "cpu" else None
    report = {
        "workload": {
            "num_prompts": args.num_prompts,
            "prompt_tokens": [MIN_PROMPT, MAX_PROMPT],
            "total_prompt_tokens": sum(len(p) for p in prompts),
            "output_tokens_each": args.output_len,
            "dtype": "float32",
            "runs": args.runs,
            "transformers": "generate(do_sample=False), one prompt at a time",
        },
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "num_cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "device": args.device,
            "gpu": gpu_name,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "checkpoints": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
