"""Serving benchmark: drives a running gateway with the `openai` async client and measures it.

Requests are streamed chat completions (`stream_options.include_usage`, `ignore_eos` so outputs
have the asked length, greedy). They arrive at each `--request-rates` value in turn (Poisson
arrivals with a fixed seed; `inf` sends them all at once), optionally capped at
`--max-concurrency` in flight. Datasets:

- `random`: windows of the tiny corpus (`shared/data/tiny_corpus.txt`), cut to `--input-len`
  prompt tokens with the server's own `/tokenize` and `/detokenize` (the chat template counted),
  `--output-len` tokens out. `--long-fraction` of them are long instead (`--long-input-len`,
  `--long-output-len`): the mixed load. Each request belongs to the group `short` or `long`.
- `jsonl`: one chat per line, `{"messages": [...]}` or `{"prompt": "..."}`, with an optional
  `"max_tokens"` (else `--output-len`); group `jsonl`.
- `image`: one random-noise PNG of `--image-size` per request (a `data:` URL, so every image is
  new to the vision cache) and a short question; group `image`.

Per request: TTFT (send to the first chunk with text), inter-token latencies (gaps between
chunks with text), TPOT ((end-to-end - TTFT) / (output tokens - 1), tokens from `usage`) and
end-to-end latency. Per rate: throughput (requests/s, input and output tokens/s), those
latencies' mean, p50, p90, p99 and max, overall and per group, each request's longest pause, and
goodput (requests per second that met every SLO given with `--slo-*`); beside them the router's
own mean TTFT parts over the run, read from `/metrics`. The JSON layout is in `docs/bench.md`.

    python -m bench.serve --base-url http://127.0.0.1:30000 --request-rates 0.5,1,2 \
        --num-prompts 40 --label disaggregated --out bench/results/serve_disagg.json --plot x.png

Needs the `bench` extra (`pip install -e ".[bench]"`: openai, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

CORPUS = Path(__file__).parent.parent / "shared" / "data" / "tiny_corpus.txt"
PERCENTILES = (50, 90, 99)
SERVER_PARTS = ("queue", "prefill", "kv_transfer", "first_decode_step", "time_to_first_token",
                "inter_token_latency")  # fmt: skip
SCHEMA = "kimiserve.bench.serve/1"


@dataclasses.dataclass
class Prompt:
    messages: list[dict[str, Any]]
    max_tokens: int
    group: str


@dataclasses.dataclass
class Outcome:
    """One request's measurements (seconds); `error` set when it failed."""

    group: str
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------- datasets


async def random_prompts(http: httpx.AsyncClient, args: argparse.Namespace) -> list[Prompt]:
    """Corpus windows of exactly the asked prompt length in tokens, the chat template counted
    (re-tokenizing the decoded window may shift the count by a token or two)."""
    model = args.model
    corpus = await _post(http, "/tokenize", {"model": model, "prompt": CORPUS.read_text()})
    corpus = corpus["tokens"]
    empty = [{"role": "user", "content": ""}]
    overhead = (await _post(http, "/tokenize", {"model": model, "messages": empty}))["count"]
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.num_prompts):
        long = rng.random() < args.long_fraction
        input_len = args.long_input_len if long else args.input_len
        num = max(1, input_len - overhead)
        assert num <= len(corpus), f"--input-len {input_len} exceeds the corpus ({len(corpus)})"
        start = rng.randrange(0, len(corpus) - num + 1)
        text = (await _post(http, "/detokenize", {"model": model,
                                                  "tokens": corpus[start : start + num]}))["prompt"]  # fmt: skip
        prompts.append(Prompt([{"role": "user", "content": text}],
                              args.long_output_len if long else args.output_len,
                              "long" if long else "short"))  # fmt: skip
    return prompts


def jsonl_prompts(args: argparse.Namespace) -> list[Prompt]:
    prompts = []
    with open(args.dataset_path) as lines:
        for line in lines:
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            prompts.append(Prompt(messages, int(row.get("max_tokens", args.output_len)), "jsonl"))
    assert prompts, f"no prompts in {args.dataset_path}"
    return [prompts[i % len(prompts)] for i in range(args.num_prompts)]


def image_prompts(args: argparse.Namespace) -> list[Prompt]:
    from PIL import Image

    width, height = (int(x) for x in args.image_size.split("x"))
    rng = np.random.default_rng(args.seed)
    prompts = []
    for _ in range(args.num_prompts):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": "Describe this image."}]  # fmt: skip
        prompts.append(Prompt([{"role": "user", "content": content}], args.output_len, "image"))
    return prompts


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(path, json=body)
    response.raise_for_status()
    return response.json()


# ---------------------------------------------------------------- load


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: Prompt) -> Outcome:
    outcome = Outcome(prompt.group)
    start = last = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=prompt.messages, max_tokens=prompt.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                outcome.prompt_tokens = chunk.usage.prompt_tokens
                outcome.output_tokens = chunk.usage.completion_tokens
            if not chunk.choices or not _has_text(chunk.choices[0].delta):
                continue
            if outcome.ttft == 0.0:
                outcome.ttft = now - start
            else:
                outcome.itl.append(now - last)
            last = now
        outcome.e2e = time.perf_counter() - start
        if outcome.ttft == 0.0:
            outcome.error = "no text in the stream"
    except openai.APIError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def _has_text(delta: Any) -> bool:
    extra = delta.model_extra or {}
    return bool(delta.content or extra.get("reasoning_content") or delta.tool_calls)


async def run_at_rate(client: openai.AsyncOpenAI, args: argparse.Namespace,
                      prompts: list[Prompt], rate: float) -> tuple[list[Outcome], float]:  # fmt: skip
    """Sends every prompt, Poisson arrivals at `rate` per second; returns outcomes and seconds."""
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

    async def limited(prompt: Prompt) -> Outcome:
        async with limit:
            return await one_request(client, args.model, prompt)

    started = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(limited(prompt)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - started


# ---------------------------------------------------------------- metrics


def stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    ms = np.asarray(values) * 1000
    pcts = {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    return {"mean": float(ms.mean()), **pcts, "max": float(ms.max())}


def latencies(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    return {
        "ttft_ms": stats_ms([o.ttft for o in outcomes]),
        "itl_ms": stats_ms([gap for o in outcomes for gap in o.itl]),
        "itl_worst_ms": stats_ms([max(o.itl) for o in outcomes if o.itl]),  # one per request
        "tpot_ms": stats_ms([o.tpot for o in outcomes if o.tpot is not None]),
        "e2e_ms": stats_ms([o.e2e for o in outcomes]),
    }


def meets_slo(outcome: Outcome, slo: dict[str, float]) -> bool:
    checks = {"ttft_ms": outcome.ttft, "tpot_ms": outcome.tpot or 0.0, "e2e_ms": outcome.e2e}
    return all(checks[name] * 1000 <= bound for name, bound in slo.items())


def summarize(outcomes: list[Outcome], duration: float, rate: float,
              args: argparse.Namespace, slo: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    done = [o for o in outcomes if not o.error]
    good = [o for o in done if meets_slo(o, slo)]
    groups = sorted({o.group for o in done})
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": args.max_concurrency or None,
        "num_prompts": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": duration,
        "total_input_tokens": sum(o.prompt_tokens for o in done),
        "total_output_tokens": sum(o.output_tokens for o in done),
        "request_throughput": len(done) / duration,
        "input_throughput": sum(o.prompt_tokens for o in done) / duration,
        "output_throughput": sum(o.output_tokens for o in done) / duration,
        "goodput": len(good) / duration,
        "slo_attainment": len(good) / len(outcomes),
        **latencies(done),
        "groups": {
            g: {
                "completed": sum(o.group == g for o in done),
                **latencies([o for o in done if o.group == g]),
            }
            for g in groups
        },  # fmt: skip
    }


def print_run(run: dict[str, Any]) -> None:
    line = (f"rate {run['request_rate']}: {run['completed']}/{run['num_prompts']} ok in "
            f"{run['duration_s']:.1f}s, {run['request_throughput']:.2f} req/s, "
            f"{run['output_throughput']:.1f} out tok/s, goodput {run['goodput']:.2f} req/s")  # fmt: skip
    print(line)
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        values = "  ".join(f"{k} {_fmt(v)}" for k, v in run[name].items())
        print(f"    {name:8} {values}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:30000", help="the gateway (without /v1)")
    add("--model", default="moonshotai/Kimi-K2.5")
    add("--api-key", default="unused")
    add("--label", default="", help="names this system in reports (e.g. disaggregated)")
    add("--notes", default="", help="free text kept in the JSON (how the stack was started)")
    add("--dataset", choices=("random", "jsonl", "image"), default="random")
    add("--dataset-path", default="", help="the JSONL file of --dataset jsonl")
    add("--num-prompts", type=int, default=40, help="requests per rate")
    add("--input-len", type=int, default=128)
    add("--output-len", type=int, default=32)
    add("--long-fraction", type=float, default=0.0, help="share of long prompts (random)")
    add("--long-input-len", type=int, default=1024)
    add("--long-output-len", type=int, default=8)
    add("--image-size", default="224x224", help="WIDTHxHEIGHT of --dataset image")
    add("--request-rates", default="1", help="comma-separated requests/s; inf = all at once")
    add("--max-concurrency", type=int, default=0, help="requests in flight at most (0: no cap)")
    add("--slo-ttft-ms", type=float, default=0.0, help="goodput: TTFT bound (0: none)")
    add("--slo-tpot-ms", type=float, default=0.0, help="goodput: TPOT bound (0: none)")
    add("--slo-e2e-ms", type=float, default=0.0, help="goodput: end-to-end bound (0: none)")
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=600.0, help="seconds per request")
    add("--out", default="", help="write the JSON here")
    add("--plot", default="", help="write a PNG of latency percentiles against request rate")
    return parser.parse_args(argv)


async def load_prompts(http: httpx.AsyncClient, args: argparse.Namespace) -> list[Prompt]:
    if args.dataset == "jsonl":
        return jsonl_prompts(args)
    if args.dataset == "image":
        return image_prompts(args)
    return await random_prompts(http, args)


async def server_sums(http: httpx.AsyncClient) -> dict[str, float]:
    """The router's unlabelled Prometheus samples (`kimiserve:*`), from the gateway."""
    try:
        response = await http.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    samples = (line.split() for line in response.text.splitlines() if line.startswith("kimiserve:"))
    return {fields[0]: float(fields[1]) for fields in samples if len(fields) == 2}


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean ms of the router's latency histograms over one run: the parts of TTFT as the
    server sees them (queue, prefill, KV transfer, first decode step) and its own TTFT and ITL."""
    means = {}
    for part in SERVER_PARTS:
        name = f"kimiserve:{part}_seconds"
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        means[part] = 1000 * total / count if count else None
    return means


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    slo = {name: bound for name, bound in (("ttft_ms", args.slo_ttft_ms),
           ("tpot_ms", args.slo_tpot_ms), ("e2e_ms", args.slo_e2e_ms)) if bound > 0}  # fmt: skip
    http = httpx.AsyncClient(base_url=args.base_url, timeout=60,
                             headers={"Authorization": f"Bearer {args.api_key}"})  # fmt: skip
    prompts = await load_prompts(http, args)
    rates = [float(r) for r in args.request_rates.split(",")]
    client = openai.AsyncOpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key,
                                max_retries=0, timeout=args.timeout)  # fmt: skip
    warmup = await one_request(client, args.model, dataclasses.replace(prompts[0], max_tokens=2))
    assert not warmup.error, f"warm-up request failed: {warmup.error}"
    load_before = os.getloadavg()
    runs = []
    for rate in rates:
        before = await server_sums(http)
        outcomes, duration = await run_at_rate(client, args, prompts, rate)
        runs.append(summarize(outcomes, duration, rate, args, slo))
        runs[-1]["server_mean_ms"] = server_means(before, await server_sums(http))
        print_run(runs[-1])
    await client.close()
    await http.aclose()
    dataset = {k: getattr(args, k) for k in ("dataset", "num_prompts", "input_len", "output_len",
               "long_fraction", "long_input_len", "long_output_len", "image_size", "seed")}  # fmt: skip
    dataset["dataset_path"] = args.dataset_path or None
    dataset["groups"] = {g: sum(p.group == g for p in prompts) for g in sorted({p.group for p in prompts})}  # fmt: skip
    return {
        "schema": SCHEMA,
        "label": args.label,
        "notes": args.notes,
        "base_url": args.base_url,
        "model": args.model,
        "dataset": dataset,
        "slo": slo,
        "environment": {
            "num_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
        },  # fmt: skip
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(bench(args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from bench.serve_report import plot_latency

        plot_latency({args.label or "kimiserve": result["runs"]}, args.plot)


if __name__ == "__main__":
    main()
