"""KV transfer benchmark: the product's `KVSender`/`KVReceiver` against raw TCP loopback.

Two processes: this one is the prefill side (a `KVSender` and a socket client); a spawned child is
the decode side (`KVReceiver`s writing into one `KVCache`, and a socket server receiving into a
preallocated buffer). A transfer is timed from the start of `send` until its acknowledgement
arrived; the socket baseline moves the same bytes with `sendall`/`recv_into` and a one-byte
acknowledgement. Measurements of the baseline and of every variant are interleaved, so all see
the same machine load.

Variants differ only in the request's page table (the sender is told it, as the prefill worker
is told the decode worker's `TransferDescriptor`):
- `direct`: the pages a `PageAllocator` hands out, one run of consecutive ids (its first fit
  keeps a big free run even under churn), so every piece is received straight into the cache:
  the product figure;
- `fragmented`: the same pages shuffled, no two neighbours consecutive, so every piece goes
  through staging and `KVCache.scatter`: the product's fallback;
- `no_write`: fragmented, with the scatter skipped: the transport alone.

KV layout is Kimi-K2.5's: 61 layers x (512 + 64) bf16 values per token, 70,272 bytes per token,
held by the sender as ckv [L, S, 512] and kpe [L, S, 64], as the prefill engine gathers them.

    python -m bench.transfer [--sizes 1024,8192,32768] [--runs 3] [--repeats 3]

Prints a table per run and their medians, and writes `bench/results/transfer.json` (medians
first, then every run). Peak memory is about three copies of the
largest size (32K tokens: 2.3 GB each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

import torch

from shared.checkpoint import TEXT_CONFIG
from shared.config import ModelConfig, TextConfig
from shared.kv_cache import KVCache, PageAllocator, pages_needed
from shared.kv_transfer import CHUNK_BYTES, KVReceiver, KVSender
from shared.messages import KVPushMsg

NUM_LAYERS, KV_LORA_RANK, ROPE_DIM = 61, 512, 64
WIDTH = KV_LORA_RANK + ROPE_DIM
DTYPE = torch.bfloat16
PAGE_SIZE = 16
HOST = "127.0.0.1"
TIMEOUT = 120.0
VARIANTS = ("direct", "fragmented", "no_write")
RESULTS = Path(__file__).parent / "results" / "transfer.json"


def latent_config() -> TextConfig:
    """Kimi-K2.5's latent dimensions on top of the tiny config (KVCache reads only these)."""
    base = ModelConfig.from_dict(TEXT_CONFIG).text
    return dataclasses.replace(base, num_hidden_layers=NUM_LAYERS, kv_lora_rank=KV_LORA_RANK,
                               qk_rope_head_dim=ROPE_DIM)  # fmt: skip


def bytes_per_token() -> int:
    return NUM_LAYERS * WIDTH * DTYPE.itemsize


# ---------------------------------------------------------------- decode side (child process)


def page_table(variant: str, num_tokens: int) -> list[int]:
    """The request's page table in `variant`; the same in both processes."""
    pages = PageAllocator(pages_needed(num_tokens, PAGE_SIZE)).allocate(
        pages_needed(num_tokens, PAGE_SIZE)
    )
    if variant == "direct":
        return pages
    return pages[::2] + pages[1::2]


class _NoWriteCache(KVCache):
    """The cache's tensors without `scatter`: staged pieces are received and dropped."""

    def __init__(self, cache: KVCache) -> None:
        self.__dict__.update(cache.__dict__)

    def scatter(self, page_ids: list[int], ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        pass


def _socket_server(listener: socket.socket, max_bytes: int) -> None:
    """Receives length-prefixed payloads into one preallocated buffer; acks each with a byte."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(max_bytes))
    header = bytearray(8)
    while conn.recv_into(header, 8, socket.MSG_WAITALL) == 8:
        (size,) = struct.unpack("<Q", header)
        got = 0
        while got < size:
            n = conn.recv_into(buf[got:size])
            if n == 0:
                return
            got += n
        conn.sendall(b"k")


def _decode_side(conn, max_tokens: int, variants: list[str]) -> None:
    torch.set_num_threads(1)
    cache = KVCache(latent_config(), pages_needed(max_tokens, PAGE_SIZE), PAGE_SIZE, DTYPE, "cpu")

    def resolve(request_id: str) -> list[int]:  # ids end in the variant and the token count
        variant, num_tokens = request_id.rsplit("-", 2)[1:]
        return page_table(variant, int(num_tokens))

    addresses, receivers = {}, []
    for variant in variants:
        receiver = KVReceiver(
            host=HOST,
            cache=_NoWriteCache(cache) if variant == "no_write" else cache,
            resolve=resolve,
            on_done=lambda request_id, push, error: None,
            timeout=TIMEOUT,
        )
        receivers.append(receiver)
        addresses[variant] = (receiver.rendezvous_address, receiver.control_address)
    listener = socket.create_server((HOST, 0))
    threading.Thread(target=_socket_server, args=(listener, max_tokens * bytes_per_token()),
                     daemon=True).start()  # fmt: skip
    conn.send((addresses, listener.getsockname()[1]))
    while conn.recv() != "stop":  # the parent asks for this process's CPU seconds
        conn.send(time.process_time())
    for receiver in receivers:
        receiver.close()


# ---------------------------------------------------------------- prefill side (this process)


class Bench:
    def __init__(self, conn, addresses: dict, sock_port: int, max_tokens: int) -> None:
        self.conn, self.addresses = conn, addresses
        self.sender = KVSender("bench-prefill", TIMEOUT)
        self.sock = socket.create_connection((HOST, sock_port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One flat buffer per tensor; each size is a contiguous prefix viewed as [L, S, *].
        self.flats = [torch.empty(NUM_LAYERS * max_tokens * width, dtype=DTYPE)
                      for width in (KV_LORA_RANK, ROPE_DIM)]  # fmt: skip
        for flat in self.flats:
            flat.view(torch.int16).random_(-(2**15), 2**15 - 1)
        self.num_sent = 0

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by both processes, all threads."""
        self.conn.send("cpu")
        return time.process_time() + self.conn.recv()

    def kv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ckv [L, S, r] and kpe [L, S, R]."""
        return tuple(flat[: NUM_LAYERS * num_tokens * width].view(NUM_LAYERS, num_tokens, width)
                     for flat, width in zip(self.flats, (KV_LORA_RANK, ROPE_DIM)))  # fmt: skip

    def product(self, variant: str, num_tokens: int) -> float:
        """Seconds from `send` until acknowledged."""
        self.num_sent += 1
        push = KVPushMsg(pair_id="", request_id=f"bench-{self.num_sent}-{variant}-{num_tokens}",
                         num_tokens=num_tokens, tag=0, first_token=1, first_logprob=0.0)  # fmt: skip
        pages = page_table(variant, num_tokens)
        started = time.perf_counter()
        self.sender.send(*self.addresses[variant], push, *self.kv(num_tokens), pages, PAGE_SIZE)
        return time.perf_counter() - started

    def raw_socket(self, num_tokens: int) -> float:
        """Seconds to move the same bytes over plain TCP and read a one-byte ack."""
        payloads = [memoryview(t.view(torch.uint8).numpy()).cast("B") for t in self.kv(num_tokens)]
        ack = bytearray(1)
        started = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", sum(len(payload) for payload in payloads)))
        for payload in payloads:
            self.sock.sendall(payload)
        self.sock.recv_into(ack, 1, socket.MSG_WAITALL)
        return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_size(bench: Bench, variants: list[str], num_tokens: int, repeats: int) -> dict:
    """Medians over `repeats` interleaved rounds (after one warm-up round).

    `ratio` is the median over rounds of socket time / variant time, each pair measured back to
    back; `cpu_s_per_gb` counts the CPU of both processes, which other load barely inflates.
    """
    nbytes = num_tokens * bytes_per_token()
    runs = {"socket": lambda: bench.raw_socket(num_tokens)}
    for variant in variants:
        runs[variant] = lambda variant=variant: bench.product(variant, num_tokens)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            before = bench.cpu_seconds()
            elapsed = run()
            if round_:
                seconds[name].append(elapsed)
                cpu[name].append((bench.cpu_seconds() - before) / (nbytes / 1e9))
    gbps = {name: nbytes / statistics.median(values) / 1e9 for name, values in seconds.items()}
    ratio = {v: statistics.median(s / t for s, t in zip(seconds["socket"], seconds[v]))
             for v in variants}  # fmt: skip
    return {"tokens": num_tokens, "bytes": nbytes, "gbps": gbps, "ratio": ratio,
            "cpu_s_per_gb": {name: statistics.median(values) for name, values in cpu.items()},
            "samples_s": seconds}  # fmt: skip


def measure_latency(bench: Bench, variants: list[str], num_tokens: int, iters: int) -> dict:
    """Milliseconds per transfer, p50 and p99, each variant in its own run of `iters`."""
    runs = {"socket": lambda: bench.raw_socket(num_tokens)}
    for variant in variants:
        runs[variant] = lambda variant=variant: bench.product(variant, num_tokens)
    out = {"tokens": num_tokens, "iters": iters}
    for name, run in runs.items():
        for _ in range(10):
            run()
        ms = [run() * 1e3 for _ in range(iters)]
        out[name] = {"p50_ms": statistics.median(ms), "p99_ms": _percentile(ms, 99)}
    return out


def print_table(sizes: list[dict], latency: dict, variants: list[str]) -> None:
    print(f"KV per token: {bytes_per_token()} bytes ({NUM_LAYERS} layers x {WIDTH} x {DTYPE})")
    names = ["socket", *variants]
    print("GB/s (median ratio to socket, paired per round)")
    print(f"{'tokens':>7} {'MB':>7} " + " ".join(f"{name:>16}" for name in names))
    for row in sizes:
        cells = [f"{row['gbps']['socket']:>16.2f}"]
        cells += [f"{row['gbps'][v]:>8.2f} ({row['ratio'][v]:.2f})" for v in variants]
        print(f"{row['tokens']:>7} {row['bytes'] / 1e6:>7.1f} " + " ".join(cells))
    print("CPU seconds per GB, both processes")
    for row in sizes:
        cells = [f"{row['cpu_s_per_gb'][name]:>16.2f}" for name in names]
        print(f"{row['tokens']:>7} {row['bytes'] / 1e6:>7.1f} " + " ".join(cells))
    print(f"latency of {latency['tokens']} tokens over {latency['iters']} transfers, ms")
    for name in names:
        print(f"  {name:>10}: p50 {latency[name]['p50_ms']:.2f}  p99 {latency[name]['p99_ms']:.2f}")


def run_once(args: argparse.Namespace, sizes: list[int], variants: list[str]) -> dict:
    """One run: a fresh decode-side process and sender, latency first, then every size."""
    max_tokens = max(sizes + [args.latency_tokens])
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_decode_side, args=(child_conn, max_tokens, variants), daemon=True)
    child.start()
    try:
        bench = Bench(parent_conn, *parent_conn.recv(), max_tokens)
        latency = measure_latency(bench, variants, args.latency_tokens, args.latency_iters)
        rows = [measure_size(bench, variants, n, args.repeats) for n in sizes]
    finally:
        parent_conn.send("stop")
        child.join(10)
        if child.is_alive():
            child.kill()
    return {"sizes": rows, "latency": latency}


def summarize(runs: list[dict]) -> dict:
    """Medians over runs of every per-run median (GB/s, ratio, CPU, p50, p99)."""
    rows = []
    for i, row in enumerate(runs[0]["sizes"]):
        per_run = [run["sizes"][i] for run in runs]
        out = {"tokens": row["tokens"], "bytes": row["bytes"]}
        for key in ("gbps", "ratio", "cpu_s_per_gb"):
            out[key] = {name: statistics.median(r[key][name] for r in per_run) for name in row[key]}
        rows.append(out)
    per_run = [run["latency"] for run in runs]
    latency = {"tokens": per_run[0]["tokens"], "iters": per_run[0]["iters"]}
    for name, stats in per_run[0].items():
        if isinstance(stats, dict):
            latency[name] = {k: statistics.median(r[name][k] for r in per_run) for k in stats}
    return {"sizes": rows, "latency": latency}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,8192,32768")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes each; medians")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--latency-tokens", type=int, default=16)
    parser.add_argument("--latency-iters", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")

    runs = []
    for index in range(args.runs):
        runs.append(run_once(args, sizes, variants))
        print(f"run {index + 1} of {args.runs}")
        print_table(runs[-1]["sizes"], runs[-1]["latency"], variants)
    median = summarize(runs)
    print(f"median of {args.runs} runs")
    print_table(median["sizes"], median["latency"], variants)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bytes_per_token": bytes_per_token(), "dtype": str(DTYPE), "page_size": PAGE_SIZE,
              "num_layers": NUM_LAYERS, "values_per_token_layer": WIDTH, "variants": variants,
              "chunk_bytes": CHUNK_BYTES, "median": median, "runs": runs}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
