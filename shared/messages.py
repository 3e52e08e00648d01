"""msgspec messages on ZMQ sockets (never pickle). One tagged union per socket."""

from __future__ import annotations

import msgspec


class PairHelloMsg(msgspec.Struct, tag=True):
    """Prefill -> decode: build the two-rank group of this pair under `pair_id`."""

    pair_id: str
    prefill_worker_id: str


class KVPushMsg(msgspec.Struct, tag=True):
    """Prefill -> decode: the KV of `request_id` follows on the pair's group from `tag` on."""

    pair_id: str
    request_id: str
    num_tokens: int
    tag: int
    first_token: int
    first_logprob: float
    first_top_logprobs: list[tuple[int, float]] = []
    # Token ends of the pieces the KV moves in (`shared/kv_layout.py`); empty: whole, 2 messages.
    pieces: list[int] = []


class KVAckMsg(msgspec.Struct, tag=True):
    """Decode -> prefill: the transfer of `request_id` ended; `error` is empty on success."""

    request_id: str
    error: str = ""


ControlMsg = PairHelloMsg | KVPushMsg | KVAckMsg

encoder = msgspec.msgpack.Encoder()
control_decoder = msgspec.msgpack.Decoder(ControlMsg)
