"""The `kimiserve` command: `up` starts the whole stack, `make-tiny-checkpoint` writes the default
model. Flags of `up` are generated from `StackConfig`'s fields."""

from __future__ import annotations

import argparse
import logging
import sys

import grpc

from deploy.launcher import StackConfig, run_until_interrupted
from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from shared.settings import add_dataclass_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimiserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start gateway, router, vision, prefill and decode pools")
    add_dataclass_flags(up, StackConfig)
    scale = sub.add_parser("scale", help="resize pools of a running `kimiserve up`")
    scale.add_argument("--control", default="127.0.0.1:30001", help="the launcher's control port")
    for role in ("vision", "prefill", "decode"):
        scale.add_argument(f"--{role}", type=int, default=None, help=f"{role} workers wanted")
    status = sub.add_parser("status", help="every pool and worker with its state and load")
    status.add_argument("--control", default="127.0.0.1:30001")
    tiny = sub.add_parser("make-tiny-checkpoint", help="write the tiny Kimi-K2.5 checkpoint")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = args.pop("command")
    if command == "make-tiny-checkpoint":
        from shared.checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(args["directory"], seed=args["seed"])
        return 0
    if command == "scale":
        sizes = {r: args[r] for r in ("vision", "prefill", "decode") if args[r] is not None}
        with grpc.insecure_channel(args["control"]) as channel:
            reply = ctl_grpc.LauncherStub(channel).Scale(ctl.ScaleRequest(pool_sizes=sizes))
        sys.stdout.write(f"pool sizes: {dict(reply.pool_sizes)}\n")
        return 0
    if command == "status":
        with grpc.insecure_channel(args["control"]) as channel:
            reply = ctl_grpc.LauncherStub(channel).ListWorkers(ctl.ListWorkersRequest())
        sys.stdout.write(format_status(reply.workers))
        return 0
    return run_until_interrupted(StackConfig(**args))


def format_status(workers) -> str:
    """A table of the workers; the last column is free/total KV pages, or for a vision worker
    its cache (images, MiB) and the requests whose images it holds."""
    rows = [("worker", "role", "state", "address", "in flight", "served", "free pages / cache")]
    for w in sorted(workers, key=lambda w: (w.role, w.worker_id)):
        load = f"{w.load.num_free_pages}/{w.load.num_total_pages}"
        if w.role == "vision":
            load = (f"{w.load.num_cached_images} images, {w.load.cache_bytes / 2**20:.1f} MiB, "
                    f"{w.num_pinned} pinned")  # fmt: skip
        rows.append((w.worker_id, w.role, w.state, w.address, str(w.num_inflight),
                     str(w.num_served), load))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(n) for c, n in zip(r, widths)).rstrip() + "\n" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
