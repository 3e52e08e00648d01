"""Soak test: concurrent streaming clients against a live stack for minutes, then its health.

`clients` asyncio tasks with the real `openai` async client each stream chat completions one
after another until the time is up (every request has a fresh prompt and `max_tokens` tokens).
Recorded: requests, errors (an exception, or a finish other than "length"/"stop"), time to
first token (request sent to the first text delta), inter-token latency (between deltas of one
stream), the resident memory (VmRSS) of every process of the stack once warm and at the end, and
each worker's free pages before and after.

    python -m bench.soak [--minutes 5] [--clients 64] [--max-tokens 32] [--model-path DIR]

Without `--model-path` it generates the tiny checkpoint in a temporary folder. It starts its own
stack on 127.0.0.1 and stops it at the end. Prints a table and writes `bench/results/soak.json`.
`tests/test_load.py` runs the same load for a minute in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import openai

from deploy.launcher import LocalStack, StackConfig
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc

MODEL = "moonshotai/Kimi-K2.5"
RESULTS = Path(__file__).parent / "results" / "soak.json"
WARMUP_S = 10.0
REQUEST_TIMEOUT_S = 120.0
WORDS = ("river", "lamp", "orbit", "maple", "signal", "cobalt", "harbor", "quartz", "ember")


@dataclasses.dataclass
class LoadResult:
    """What the clients saw; latencies in seconds, RSS in MiB by process name."""

    duration_s: float = 0.0
    num_requests: int = 0
    num_errors: int = 0
    error_samples: list[str] = dataclasses.field(default_factory=list)
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    itl_s: list[float] = dataclasses.field(default_factory=list)
    num_tokens: int = 0
    rss_warm_mib: dict[str, float] = dataclasses.field(default_factory=dict)
    rss_end_mib: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "duration_s": round(self.duration_s, 1),
            "requests": self.num_requests,
            "errors": self.num_errors,
            "error_samples": self.error_samples[:5],
            "completion_tokens": self.num_tokens,
            "ttft_s": _percentiles(self.ttft_s),
            "itl_s": _percentiles(self.itl_s),
            "rss_warm_mib": self.rss_warm_mib,
            "rss_end_mib": self.rss_end_mib,
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0] if values else 0.0, "p99": values[0] if values else 0.0}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 4), "p99": round(cuts[98], 4)}


def rss_mib(pid: int) -> float:
    """Resident memory of a process from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def stack_rss(stack: LocalStack) -> dict[str, float]:
    return {c.name: round(rss_mib(c.process.pid), 1) for c in stack.children}


def worker_pages(stack: LocalStack) -> dict[str, tuple[int, int]]:
    """(free, total) pages of every prefill and decode worker, from its `Status` RPC."""
    pages = {}
    for child in stack.workers("prefill") + stack.workers("decode"):
        stub_class = pb_grpc.PrefillWorkerStub
        if child.name.startswith("decode"):
            stub_class = pb_grpc.DecodeWorkerStub
        with grpc.insecure_channel(child.address) as channel:
            status = stub_class(channel).Status(pb.StatusRequest(), timeout=5)
        pages[child.name] = (status.num_free_pages, status.num_total_pages)
    return pages


def wait_for_free_pages(stack: LocalStack, within_s: float) -> dict[str, tuple[int, int]]:
    """The pages once every worker has all of them free again, or after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        pages = worker_pages(stack)
        if all(free == total for free, total in pages.values()) or time.monotonic() > deadline:
            return pages
        time.sleep(0.2)


async def _one_request(client: openai.AsyncOpenAI, index: int, max_tokens: int,
                       result: LoadResult) -> None:  # fmt: skip
    words = " ".join(WORDS[(index + k) % len(WORDS)] for k in range(index % 7 + 3))
    started = time.perf_counter()
    last = None
    finish = None
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Request {index}: {words}"}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                result.num_tokens += chunk.usage.completion_tokens
            choice = chunk.choices[0] if chunk.choices else None
            if choice is None:
                continue
            delta = choice.delta
            if delta.content or getattr(delta, "reasoning_content", None):
                now = time.perf_counter()
                if last is None:
                    result.ttft_s.append(now - started)
                else:
                    result.itl_s.append(now - last)
                last = now
            finish = choice.finish_reason or finish
        if finish not in ("length", "stop"):
            raise RuntimeError(f"finish_reason {finish!r}")
    except Exception as exc:  # every failure is counted, none stops the load
        result.num_errors += 1
        if len(result.error_samples) < 20:
            result.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
    finally:
        result.num_requests += 1


async def run_load(
    base_url: str,
    num_clients: int,
    duration_s: float,
    max_tokens: int,
    rss: Callable[[], dict[str, float]] | None = None,
    warmup_s: float = WARMUP_S,
) -> LoadResult:
    """`num_clients` streaming clients for `duration_s` seconds (no request starts after
    that); `rss()` is sampled once `warmup_s` seconds have passed and again at the end."""
    result = LoadResult()
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    started = time.monotonic()
    deadline = started + duration_s
    counter = iter(range(10**9))

    async def client_loop() -> None:
        while time.monotonic() < deadline:
            await _one_request(client, next(counter), max_tokens, result)

    async def sample_when_warm() -> None:
        await asyncio.sleep(min(warmup_s, duration_s))
        if rss is not None:
            result.rss_warm_mib = rss()

    try:
        await asyncio.gather(sample_when_warm(), *(client_loop() for _ in range(num_clients)))
    finally:
        await client.close()
    result.duration_s = time.monotonic() - started
    if rss is not None:
        result.rss_end_mib = rss()
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soak(model_path: str, minutes: float, num_clients: int, max_tokens: int) -> dict:
    config = StackConfig(model_path=model_path, port=_free_port(), num_pages=512)
    with LocalStack(config) as stack:
        pages_start = worker_pages(stack)
        load = asyncio.run(
            run_load(
                stack.base_url, num_clients, minutes * 60, max_tokens, lambda: stack_rss(stack)
            )
        )
        pages_end = wait_for_free_pages(stack, within_s=10.0)
    return {
        "config": {
            "minutes": minutes,
            "clients": num_clients,
            "max_tokens": max_tokens,
            "num_pages": config.num_pages,
            "warmup_s": WARMUP_S,
        },  # fmt: skip
        **load.summary(),
        "pages_start": pages_start,
        "pages_end": pages_end,
    }


def print_table(report: dict) -> None:
    rows = [
        ("requests", str(report["requests"])),
        ("errors", str(report["errors"])),
        ("completion tokens", str(report["completion_tokens"])),
        ("TTFT p50 / p99 (ms)", _ms_pair(report["ttft_s"])),
        ("ITL p50 / p99 (ms)", _ms_pair(report["itl_s"])),
    ]
    for name, start in report["rss_warm_mib"].items():
        end = report["rss_end_mib"].get(name, 0.0)
        growth = 100 * (end - start) / start if start else 0.0
        rows.append((f"RSS {name} (MiB)", f"{start:.0f} -> {end:.0f} ({growth:+.1f}%)"))
    for name, (free, total) in report["pages_start"].items():
        end_free = report["pages_end"][name][0]
        rows.append((f"free pages {name}", f"{free}/{total} -> {end_free}/{total}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _ms_pair(stats: dict[str, float]) -> str:
    return f"{1000 * stats['p50']:.0f} / {1000 * stats['p99']:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve soak test")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model-path", default=None, help="default: a fresh tiny checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            from shared.checkpoint import make_tiny_checkpoint

            model_path = str(make_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
        report = soak(model_path, args.minutes, args.clients, args.max_tokens)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
