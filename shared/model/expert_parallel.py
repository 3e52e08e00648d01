"""Expert parallelism: the routed experts of each MoE layer are spread over the ranks of one
worker; tokens travel to their experts and back with `all_to_all_single` (uneven splits).

Shape letters: T tokens on this rank, K experts per token, D hidden, R rows received.

Placement is a table (`expert -> rank`), loaded at start; a rebalancer only has to write a new
table. Attention stays data-parallel: each rank runs its own requests. Every rank calls every
MoE layer once per step, also with zero tokens, so the collectives always meet.

With `EPContext.time_phases`, `ep_routed` adds the seconds of its three phases to
`EPContext.timing`: "dispatch" (routing, the count exchange and the two all_to_alls out), "expert"
(the owned experts on the received rows) and "combine" (the all_to_all back and the weighted sum).
Off, it reads no clock.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """`owner[e]` is the rank that holds routed expert e (the same table for every layer)."""

    owner: tuple[int, ...]
    num_ranks: int

    @classmethod
    def round_robin(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        return cls(tuple(e % num_ranks for e in range(num_experts)), num_ranks)

    @classmethod
    def from_file(cls, path: str | Path, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """A JSON list of length `num_experts` giving each expert's rank."""
        owner = tuple(json.loads(Path(path).read_text()))
        placement = cls(owner, num_ranks)
        placement.check(num_experts)
        return placement

    def check(self, num_experts: int) -> None:
        assert len(self.owner) == num_experts, f"{len(self.owner)} owners for {num_experts} experts"
        assert set(self.owner) <= set(range(self.num_ranks)), f"ranks outside 0..{self.num_ranks}"
        for rank in range(self.num_ranks):
            assert rank in self.owner, f"rank {rank} owns no expert"

    def local_experts(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == rank]


@dataclasses.dataclass
class EPContext:
    group: dist.ProcessGroup
    rank: int
    placement: ExpertPlacement
    time_phases: bool = False  # accumulate per-phase seconds in `timing`
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase
    keepalive: tuple = ()  # the group's store and listening socket

    def __post_init__(self) -> None:
        owner = torch.tensor(self.placement.owner, dtype=torch.long)
        self.owner_of = owner  # [E] rank of each expert
        local = self.placement.local_experts(self.rank)
        self.local_index = torch.full((len(owner),), -1, dtype=torch.long)
        self.local_index[torch.tensor(local, dtype=torch.long)] = torch.arange(len(local))


def _all_to_all(group: dist.ProcessGroup, data: torch.Tensor, send: list[int],
                recv: list[int]) -> torch.Tensor:  # fmt: skip
    out = data.new_empty((sum(recv), *data.shape[1:]))
    group.alltoall_base(out, data.contiguous(), recv, send, dist.AllToAllOptions()).wait()
    return out


def exchange_counts(group: dist.ProcessGroup, send: torch.Tensor) -> list[int]:
    recv = torch.empty_like(send)
    ones = [1] * send.numel()
    group.alltoall_base(recv, send, ones, ones, dist.AllToAllOptions()).wait()
    return recv.tolist()


def _lap(ctx: EPContext, phase: str, start: float, done: torch.Tensor) -> float:
    """Adds the seconds since `start` to `ctx.timing[phase]` and returns now. On GPU it first
    waits for the queued kernels, so each phase is charged with its own work."""
    if done.is_cuda:
        torch.cuda.synchronize(done.device)
    now = time.perf_counter()
    ctx.timing[phase] = ctx.timing.get(phase, 0.0) + now - start
    return now


def ep_routed(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ctx: EPContext,
) -> torch.Tensor:
    """Routed-expert output [T, D] for this rank's tokens; w13 [E_local, 2I, D], w2 [E_local, D, I].

    Dispatch: each (token, expert) row goes to the expert's rank with its expert id. The owner
    runs its experts on what it received; combine sends the results back in the same order.
    """
    clock = time.perf_counter() if ctx.time_phases else 0.0
    num_ranks = ctx.placement.num_ranks
    flat_ids = ids.flatten()  # [T*K]
    dest = ctx.owner_of[flat_ids]  # [T*K] rank of each row's expert
    order = dest.argsort(stable=True)
    send = torch.bincount(dest, minlength=num_ranks)  # [ranks]
    recv = exchange_counts(ctx.group, send)
    send_list = send.tolist()
    token_of = order // ids.shape[1]
    rows = _all_to_all(ctx.group, x.index_select(0, token_of), send_list, recv)  # [R, D]
    row_experts = _all_to_all(ctx.group, flat_ids[order], send_list, recv)  # [R]
    if ctx.time_phases:
        clock = _lap(ctx, "dispatch", clock, rows)

    local = ctx.local_index[row_experts]  # [R] index into the local stacks
    assert bool((local >= 0).all()), "received a row for an expert this rank does not own"
    y = rows.new_empty(rows.shape)
    by_expert = local.argsort(stable=True)
    counts = torch.bincount(local, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            idx = by_expert[start : start + count]
            gate, up = F.linear(rows.index_select(0, idx), w13[expert]).chunk(2, dim=-1)
            y[idx] = F.linear(F.silu(gate) * up, w2[expert])
            start += count
    if ctx.time_phases:
        clock = _lap(ctx, "expert", clock, y)

    back = _all_to_all(ctx.group, y, recv, send_list)  # [T*K, D] in `order`
    weighted = back.float() * weights.flatten()[order, None]
    out = torch.zeros_like(x, dtype=torch.float32).index_add_(0, token_of, weighted).to(x.dtype)
    if ctx.time_phases:
        _lap(ctx, "combine", clock, out)
    return out


def create_ep_group(
    rendezvous: str, rank: int, size: int, timeout_s: float
) -> tuple[dist.ProcessGroup, tuple]:
    """The worker's own group of `size` ranks (gloo on CPU, NCCL on GPU); rank 0 hosts the store.

    The store listens only on the rendezvous host (TCPStore alone binds every interface). The
    timeout bounds every collective: a dead rank makes the others fail instead of hanging.
    Returns the group and the objects that must outlive it (keep them in `EPContext.keepalive`).
    """
    host, port = rendezvous.rsplit(":", 1)
    span = datetime.timedelta(seconds=timeout_s)
    listener = None
    if rank == 0:
        listener = socket.create_server((host, int(port)), backlog=128)
        store = dist.TCPStore(host, int(port), size, True, span, wait_for_workers=False,
                              master_listen_fd=listener.fileno())  # fmt: skip
    else:
        store = dist.TCPStore(host, int(port), size, False, span)
    prefixed = dist.PrefixStore("ep", store)
    if torch.cuda.is_available():
        group = dist.ProcessGroupNCCL(prefixed, rank, size, dist.ProcessGroupNCCL.Options())
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, size, span)
    return group, (store, listener)


def enable_expert_parallel(model, ctx: EPContext) -> None:
    """Makes every MoE layer of `model` dispatch to the experts' ranks through `ctx`."""
    from shared.model.moe import MoE

    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.ep = ctx
