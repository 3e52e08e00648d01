"""KV transfer benchmark: the product's `KVSender`/`KVReceiver` against raw TCP loopback.

Two processes: this one is the prefill side (a `KVSender` and a socket client); a spawned child is
the decode side (`KVReceiver`s writing into one `KVCache`, and a socket server receiving into a
preallocated buffer). A transfer is timed from the start of `send` until its acknowledgement
arrived; the socket baseline moves the same bytes with `sendall`/`recv_into` and a one-byte
acknowledgement. Measurements of the baseline and of every variant are interleaved, so all see
the same machine load.

Variants differ only on the decode side:
- `as_wired`: `write_pages` = `KVCache.scatter`, without `page_size` (one write at the end);
- `pipelined`: the same with `page_size` given, so chunks are written while the next arrives:
  this is how `decode_worker/server.py` builds its receiver, the product figure;
- `page_copy`: pipelined, with the bench's own copy per page (now what `KVCache.scatter` does
  on CPU, kept as a cross-check);
- `no_write`: pipelined, `write_pages` does nothing: the transport alone.

KV layout is Kimi-K2.5's: 61 layers x (512 + 64) bf16 values per token, 70,272 bytes per token.
Pages come in a shuffled order, as in a worker whose cache has churned.

    python -m bench.transfer [--sizes 1024,8192,32768] [--runs 3] [--repeats 3]

Prints a table per run and their medians, and writes `bench/results/transfer.json` (medians
first, then every run). Peak memory is about four copies of the
largest size (32K tokens: 2.3 GB each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import random
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

import torch

from shared.checkpoint import TEXT_CONFIG
from shared.config import ModelConfig, TextConfig
from shared.kv_cache import KVCache, pages_needed
from shared.kv_transfer import CHUNK_BYTES, KVReceiver, KVSender
from shared.messages import KVPushMsg

NUM_LAYERS, KV_LORA_RANK, ROPE_DIM = 61, 512, 64
WIDTH = KV_LORA_RANK + ROPE_DIM
DTYPE = torch.bfloat16
PAGE_SIZE = 16
HOST = "127.0.0.1"
TIMEOUT = 120.0
VARIANTS = ("pipelined", "no_write")  # see the docstring for the others
RESULTS = Path(__file__).parent / "results" / "transfer.json"


def latent_config() -> TextConfig:
    """Kimi-K2.5's latent dimensions on top of the tiny config (KVCache reads only these)."""
    base = ModelConfig.from_dict(TEXT_CONFIG).text
    return dataclasses.replace(base, num_hidden_layers=NUM_LAYERS, kv_lora_rank=KV_LORA_RANK,
                               qk_rope_head_dim=ROPE_DIM)  # fmt: skip


def bytes_per_token() -> int:
    return NUM_LAYERS * WIDTH * DTYPE.itemsize


# ---------------------------------------------------------------- decode side (child process)


def _page_copy(cache: KVCache, pages: list[int], kv: torch.Tensor) -> None:
    """Writes kv [L, T, r+R] page by page: two strided copies per page, no index kernels."""
    ckv, kpe = kv.split([KV_LORA_RANK, ROPE_DIM], -1)
    for i, page in enumerate(pages):
        start = i * cache.page_size
        end = min(start + cache.page_size, kv.shape[1])
        cache.ckv[:, page, : end - start].copy_(ckv[:, start:end])
        cache.kpe[:, page, : end - start].copy_(kpe[:, start:end])


def _writer(variant: str, cache: KVCache):
    if variant in ("as_wired", "pipelined"):  # decode_worker/server.py's write_pages
        return lambda pages, kv: cache.scatter(pages, *kv.split([KV_LORA_RANK, ROPE_DIM], -1))
    if variant == "page_copy":
        return lambda pages, kv: _page_copy(cache, pages, kv)
    return lambda pages, kv: None


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
    num_pages = pages_needed(max_tokens, PAGE_SIZE)
    cache = KVCache(latent_config(), num_pages, PAGE_SIZE, DTYPE, "cpu")
    page_ids = list(range(num_pages))
    random.Random(0).shuffle(page_ids)

    def resolve(request_id: str) -> list[int]:  # ids end in the token count
        return page_ids[: pages_needed(int(request_id.rsplit("-", 1)[1]), PAGE_SIZE)]

    addresses, receivers = {}, []
    for variant in variants:
        receiver = KVReceiver(
            host=HOST,
            write_pages=_writer(variant, cache),
            resolve=resolve,
            on_done=lambda request_id, push, error: None,
            kv_shape=(NUM_LAYERS, WIDTH),
            dtype=DTYPE,
            timeout=TIMEOUT,
            page_size=None if variant == "as_wired" else PAGE_SIZE,
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
        # One flat buffer; each size is a contiguous prefix viewed as [L, S, r+R].
        self.flat = torch.empty(NUM_LAYERS * max_tokens * WIDTH, dtype=DTYPE)
        self.flat.view(torch.int16).random_(-(2**15), 2**15 - 1)
        self.num_sent = 0

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by both processes, all threads."""
        self.conn.send("cpu")
        return time.process_time() + self.conn.recv()

    def kv(self, num_tokens: int) -> torch.Tensor:
        return self.flat[: NUM_LAYERS * num_tokens * WIDTH].view(NUM_LAYERS, num_tokens, WIDTH)

    def product(self, variant: str, num_tokens: int) -> float:
        """Seconds from `send` until acknowledged."""
        self.num_sent += 1
        push = KVPushMsg(pair_id="", request_id=f"bench-{self.num_sent}-{num_tokens}",
                         num_tokens=num_tokens, tag=0, first_token=1, first_logprob=0.0)  # fmt: skip
        started = time.perf_counter()
        self.sender.send(*self.addresses[variant], push, self.kv(num_tokens))
        return time.perf_counter() - started

    def raw_socket(self, num_tokens: int) -> float:
        """Seconds to move the same bytes over plain TCP and read a one-byte ack."""
        payload = memoryview(self.kv(num_tokens).view(torch.uint8).numpy()).cast("B")
        ack = bytearray(1)
        started = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", len(payload)))
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
