"""Conversions between protobuf messages and internal types, shared by the servers."""

from __future__ import annotations

from proto import kimiserve_pb2 as pb
from shared.sampling import GrammarSpec, Sampled, SamplingConfig

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly to a restarted worker instead of backing off for up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def sampling_from_proto(params: pb.SamplingParams) -> SamplingConfig:
    return SamplingConfig(
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        top_k=max(params.top_k, 0),
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty or 1.0,
        seed=params.seed if params.HasField("seed") else None,
        top_logprobs=params.top_logprobs if params.logprobs else 0,
        grammar=grammar_from_proto(params.grammar) if params.HasField("grammar") else None,
    )


def grammar_from_proto(grammar: pb.Grammar) -> GrammarSpec:
    end = grammar.reasoning_end_token_id if grammar.HasField("reasoning_end_token_id") else None
    return GrammarSpec(grammar.kind, grammar.schema_json, end)


def token_to_proto(sampled: Sampled) -> pb.TokenOutput:
    return pb.TokenOutput(
        token_id=sampled.token_id,
        logprob=sampled.logprob,
        top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in sampled.top_logprobs],
    )
