"""The router's sampling decisions: defaults for unset fields, limits, stop ids, per-sample seeds,
the grammar's check and start.

The gateway leaves a sampling field unset when the client did; the router fills it here, so
workers always receive a `SamplingParams` with every field set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from proto import kimiserve_pb2 as pb
from router.prompt import InvalidRequest, Prompt, context_length_message
from shared.grammar import GrammarError, check_spec

INT64_SPAN = 2**64
INT64_MIN = -(2**63)
# Keys of `generation_config.json` that override the model card's sampling defaults.
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Values for the sampling fields a request leaves unset.

    The model card recommends temperature 1.0 in thinking mode and 0.6 in instant mode, top_p
    0.95 in both (spec section 11); text completions use the thinking values. A checkpoint's
    `generation_config.json` overrides them, for both modes, as vLLM does by default.
    """

    temperature: float = 1.0
    instant_temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_dir(cls, model_path: str | Path) -> SamplingDefaults:
        path = Path(model_path) / "generation_config.json"
        config: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        fields = {k: config[k] for k in _GENERATION_CONFIG_KEYS if config.get(k) is not None}
        if "temperature" in fields:
            fields["instant_temperature"] = fields["temperature"]
        return cls(**fields)


def resolve_sampling(request: pb.GenerateRequest, prompt: Prompt, defaults: SamplingDefaults,
                     context_length: int, eos_ids: tuple[int, ...]) -> pb.SamplingParams:  # fmt: skip
    """The request's sampling with defaults applied, `max_tokens` fitted to the context and the
    end-of-turn ids added to the stop ids; raises `InvalidRequest` when the prompt or the limit
    does not fit."""
    sampling = pb.SamplingParams()
    sampling.CopyFrom(request.sampling)
    _apply_defaults(sampling, defaults, instant=prompt.is_chat and not prompt.thinking)
    num_prompt = len(prompt.token_ids)
    if num_prompt >= context_length:
        raise InvalidRequest(context_length_message(context_length, num_prompt),
                             "messages" if prompt.is_chat else "prompt")  # fmt: skip
    room = context_length - num_prompt
    if sampling.max_tokens <= 0:
        sampling.max_tokens = room
    elif sampling.max_tokens > room:
        param = request.max_tokens_param or "max_tokens"
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {num_prompt + sampling.max_tokens} tokens ({num_prompt} in the prompt, "
            f"{sampling.max_tokens} in `{param}`). Reduce the prompt or `{param}`.", param)  # fmt: skip
    if not sampling.ignore_eos:
        sampling.stop_token_ids.extend(eos_ids)
    return sampling


def resolve_grammar(sampling: pb.SamplingParams, prompt: Prompt, reasoning_end_id: int) -> None:
    """Checks the request's grammar, once, so a worker never meets one it cannot compile
    (raises `InvalidRequest` naming `response_format`), and sets where it starts: after the
    reasoning when the prompt leaves the model inside it, else at the first token."""
    if not sampling.HasField("grammar"):
        return
    grammar = sampling.grammar
    if prompt.forced_output:
        message = ("response_format cannot be combined with tool_choice 'required' or a named "
                   "function: both decide the output")  # fmt: skip
        raise InvalidRequest(message, "response_format")
    try:
        check_spec(grammar.kind, grammar.schema_json)
    except GrammarError as exc:
        what = "json_schema.schema" if grammar.kind == "json_schema" else "type"
        raise InvalidRequest(f"response_format.{what} cannot be enforced: {exc}",
                             "response_format") from exc  # fmt: skip
    grammar.ClearField("reasoning_end_token_id")
    if prompt.thinking:
        grammar.reasoning_end_token_id = reasoning_end_id


def _apply_defaults(sampling: pb.SamplingParams, defaults: SamplingDefaults, instant: bool) -> None:
    values = {
        "temperature": defaults.instant_temperature if instant else defaults.temperature,
        "top_p": defaults.top_p,
        "top_k": defaults.top_k,
        "min_p": defaults.min_p,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": defaults.repetition_penalty,
    }
    for name, value in values.items():
        if not sampling.HasField(name):
            setattr(sampling, name, value)


def for_sample(sampling: pb.SamplingParams, index: int) -> pb.SamplingParams:
    """Sample `index`'s parameters: a seeded request seeds sample i with `seed + i`, so choices
    differ from each other and choice i equals an n=1 request with seed `seed + i`."""
    if index == 0 or not sampling.HasField("seed"):
        return sampling
    out = pb.SamplingParams()
    out.CopyFrom(sampling)
    out.seed = (sampling.seed + index - INT64_MIN) % INT64_SPAN + INT64_MIN
    return out
