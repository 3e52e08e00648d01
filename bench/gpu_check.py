"""Python parts of `bench/gpu_check.sh` (see docs/bench.md, "GPU check").

    python -m bench.gpu_check env --device cuda --out DIR/env.json
    python -m bench.gpu_check attention --device cuda --out DIR/attention.json [--tiny]
    python -m bench.gpu_check checkpoint --size gpu --out CHECKPOINT_DIR
    python -m bench.gpu_check wait-ready --url http://127.0.0.1:PORT --pid PID --timeout 240
    python -m bench.gpu_check summary --dir DIR

`attention` runs the PyTorch and the FlashInfer attention backends on the same random pages
(shuffled page tables, ragged lengths) for decode and prefill shapes with Kimi-K2.5's MLA dims
in bf16 (`--tiny`: small dims, for a CPU dry run), and reports their largest absolute difference
and the median time per call (CUDA events). FlashInfer is looked at only on a CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared.attention import ForwardBatch, TorchAttentionBackend, make_attention_backend
from shared.config import yarn_mscale
from shared.kv_cache import KVCache, pages_needed


@dataclasses.dataclass(frozen=True)
class Dims:
    heads: int
    kv_lora_rank: int
    rope_dim: int
    scale: float


# Kimi-K2.5: 64 heads, latent 512 + rope 64; softmax scale 1/sqrt(128 + 64) times YaRN's
# mscale(factor 64, mscale_all_dim 1)^2, as `TextConfig.softmax_scale` computes it.
KIMI_DIMS = Dims(64, 512, 64, (128 + 64) ** -0.5 * yarn_mscale(64.0, 1.0) ** 2)
TINY_DIMS = Dims(4, 32, 8, 0.3)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "decode" (one query per sequence) or "prefill" (the last q_len of context)
    batch: int
    q_len: int
    context: int  # the longest sequence's kv_len; the others are up to a quarter shorter


def gpu_cases() -> list[Case]:
    decode = [Case("decode", b, 1, c) for b in (1, 16, 64, 128) for c in (1024, 8192, 32768)
              if b * c <= 2 * 2**20]  # fmt: skip
    prefill = [Case("prefill", 1, 1024, 1024), Case("prefill", 1, 4096, 4096),
               Case("prefill", 4, 512, 2048), Case("prefill", 8, 256, 8192)]  # fmt: skip
    return decode + prefill


def tiny_cases() -> list[Case]:
    return [Case("decode", 1, 1, 64), Case("decode", 8, 1, 256), Case("prefill", 1, 64, 64),
            Case("prefill", 3, 16, 100)]  # fmt: skip


class _CacheShape:  # the fields KVCache reads
    num_hidden_layers = 1

    def __init__(self, dims: Dims) -> None:
        self.kv_lora_rank, self.qk_rope_head_dim = dims.kv_lora_rank, dims.rope_dim


def random_case(
    case: Case, dims: Dims, page_size: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[KVCache, ForwardBatch, torch.Tensor, torch.Tensor]:
    """A one-layer cache of random latents, a batch over shuffled pages, and its queries.

    Sequence i has `context - i * context // (4 * batch)` tokens (ragged, never below q_len);
    its pages are a random subset of the pool in random order.
    """
    kv_lens = [max(case.q_len, case.context - i * case.context // (4 * case.batch))
               for i in range(case.batch)]  # fmt: skip
    counts = [pages_needed(n, page_size) for n in kv_lens]
    num_pages = sum(counts) + 8  # a few pages no sequence owns
    order = list(range(num_pages))
    random.Random(seed).shuffle(order)
    tables, start = [], 0
    for count in counts:
        tables.append(order[start : start + count])
        start += count
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(_CacheShape(dims), num_pages, page_size, dtype, device)
    cache.ckv.normal_(generator=gen)
    cache.kpe.normal_(generator=gen)
    num_q = case.q_len * case.batch
    q_lat = torch.randn(num_q, dims.heads, dims.kv_lora_rank, generator=gen, device=device,
                        dtype=dtype)  # fmt: skip
    q_pe = torch.randn(num_q, dims.heads, dims.rope_dim, generator=gen, device=device, dtype=dtype)
    zeros = torch.zeros(num_q, dtype=torch.long, device=device)
    batch = ForwardBatch(zeros, zeros, zeros, [case.q_len] * case.batch, kv_lens, tables)
    return cache, batch, q_lat, q_pe


def reference(
    cache: KVCache, batch: ForwardBatch, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float
) -> torch.Tensor:
    """Float32 causal attention per sequence over its gathered latents: [T, H, r]."""
    outs, start = [], 0
    for q_len, kv_len, pages in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
        ckv, kpe = (t[0].float() for t in cache.gather(pages, kv_len))  # [S, r], [S, R]
        ql, qp = q_lat[start : start + q_len].float(), q_pe[start : start + q_len].float()
        scores = torch.einsum("thr,sr->hts", ql, ckv) + torch.einsum("thr,sr->hts", qp, kpe)
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=ckv.device)
        scores = (scores * scale).masked_fill(~visible.tril(kv_len - q_len), float("-inf"))
        outs.append(torch.einsum("hts,sr->thr", scores.softmax(-1), ckv))
        start += q_len
    return torch.cat(outs)


def time_ms(fn: Callable[[], Any], device: str, iters: int) -> float:
    """Median milliseconds per call after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - t0))
    return statistics.median(samples)


def compare_case(case: Case, dims: Dims, device: str, dtype: torch.dtype, iters: int) -> dict:
    cache, batch, q_lat, q_pe = random_case(case, dims, 16, dtype, device)
    row: dict[str, Any] = {**dataclasses.asdict(case), "num_tokens": sum(batch.kv_lens)}
    torch_backend = TorchAttentionBackend(cache, dims.scale)
    out_torch = torch_backend.forward(0, q_lat, q_pe, batch)
    if sum(batch.kv_lens) * case.q_len <= 2**16:  # the per-sequence reference is slow
        ref = reference(cache, batch, q_lat, q_pe, dims.scale)
        row["torch_vs_reference"] = (out_torch.float() - ref).abs().max().item()
    row["torch_ms"] = time_ms(lambda: torch_backend.forward(0, q_lat, q_pe, batch), device, iters)
    fast = make_attention_backend(cache, dims.scale, device)
    if isinstance(fast, TorchAttentionBackend):
        return row
    started = time.perf_counter()
    out_fast = fast.forward(0, q_lat, q_pe, batch)  # plans (and on first use JIT-compiles)
    torch.cuda.synchronize(device)
    row["flashinfer_first_call_s"] = time.perf_counter() - started
    row["max_abs_diff"] = (out_fast.float() - out_torch.float()).abs().max().item()
    row["max_abs_output"] = out_torch.float().abs().max().item()
    row["flashinfer_ms"] = time_ms(lambda: fast.forward(0, q_lat, q_pe, batch), device, iters)
    row["plan_ms"] = time_ms(lambda: fast.plan(batch, dims.heads, dtype), device, iters)
    row["speedup"] = row["torch_ms"] / row["flashinfer_ms"]
    return row


def cmd_attention(args: argparse.Namespace) -> int:
    dims, cases = (TINY_DIMS, tiny_cases()) if args.tiny else (KIMI_DIMS, gpu_cases())
    dtype = getattr(torch, args.dtype)
    backend = "torch"
    if args.device.startswith("cuda"):  # never import flashinfer for a CPU run
        probe = KVCache(_CacheShape(dims), 1, 16, dtype, args.device)
        backend = type(make_attention_backend(probe, dims.scale, args.device)).__name__
    print(f"attention: {dims} {args.dtype} on {args.device}, fast backend {backend}", flush=True)
    rows = []
    for case in cases:
        try:
            row = compare_case(case, dims, args.device, dtype, args.iters)
        except Exception as exc:  # one failing shape (OOM, kernel error) must not hide the others
            row = {**dataclasses.asdict(case), "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    diffs = [r["max_abs_diff"] for r in rows if "max_abs_diff" in r]
    report = {
        "device": _device_name(args.device),
        "dims": dataclasses.asdict(dims),
        "dtype": args.dtype,
        "page_size": 16,
        "fast_backend": backend,
        "max_abs_diff": max(diffs) if diffs else None,
        "num_errors": sum("error" in r for r in rows),
        "cases": rows,
    }
    _write_json(args.out, report)
    return 1 if report["num_errors"] else 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from shared.checkpoint import make_tiny_checkpoint

    started = time.perf_counter()
    path = make_tiny_checkpoint(args.out, seed=0, size=args.size)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    print(
        f"{args.size} checkpoint: {size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s"
    )
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    modules = ["zmq", "msgspec", "grpc", "google.protobuf", "fastapi", "uvicorn", "httpx",
               "openai", "safetensors", "tiktoken", "jinja2", "PIL", "prometheus_client",
               "matplotlib", "transformers", "pytest", "flashinfer"]  # fmt: skip
    # find_spec only: importing flashinfer on a CPU machine is what the backend rule forbids.
    found = {m: importlib.util.find_spec(m) is not None for m in modules}
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": _device_name(args.device),
        "num_cpus": os.cpu_count(),
        "modules_found": found,
        "missing": [m for m, ok in found.items() if not ok],
    }
    if found["flashinfer"] and args.device.startswith("cuda"):
        import flashinfer

        report["flashinfer"] = getattr(flashinfer, "__version__", "?")
    _write_json(args.out, report)
    return 0


def cmd_wait_ready(args: argparse.Namespace) -> int:
    """Polls `URL/health/ready` until it answers 200, the process `pid` ends, or the timeout."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{args.url}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return 0
        except OSError:
            pass
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            print("the stack exited before it was ready", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"the stack was not ready within {args.timeout} s", file=sys.stderr)
    return 1


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _write_json(path: str, value: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    from bench.gpu_check_summary import cmd_summary

    parser = argparse.ArgumentParser(description="kimiserve GPU check helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--device", default="cuda")
    env.add_argument("--out", required=True)
    att = sub.add_parser("attention")
    att.add_argument("--device", default="cuda")
    att.add_argument("--dtype", default="bfloat16")
    att.add_argument("--tiny", action="store_true", help="small dims and shapes (CPU dry run)")
    att.add_argument("--iters", type=int, default=20)
    att.add_argument("--out", required=True)
    ckpt = sub.add_parser("checkpoint")
    ckpt.add_argument("--size", default="gpu")
    ckpt.add_argument("--out", required=True)
    wait = sub.add_parser("wait-ready")
    wait.add_argument("--url", required=True)
    wait.add_argument("--pid", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=240)
    summary = sub.add_parser("summary")
    summary.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    commands = {"env": cmd_env, "attention": cmd_attention, "checkpoint": cmd_checkpoint,
                "wait-ready": cmd_wait_ready, "summary": cmd_summary}  # fmt: skip
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
