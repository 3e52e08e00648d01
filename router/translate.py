"""OpenAI request models -> the router's `GenerateRequest`.

The gateway only moves fields: templating, tokenizing and parsing happen in the router. Tools,
`tool_choice` and `chat_template_kwargs` travel as the client's JSON text. Sampling fields the
client left out get OpenAI's defaults, because the wire message has no "unset" for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from proto import kimiserve_pb2 as pb
from router.errors import invalid_request
from router.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    GenerationRequest,
)

T = TypeVar("T")

# OpenAI's default for text completions; chat completions default to "until the context ends".
DEFAULT_COMPLETION_MAX_TOKENS = 16


def chat_to_proto(request: ChatCompletionRequest, request_id: str) -> pb.GenerateRequest:
    """Builds the router request of a validated chat completion; 400 on unencodable text."""
    # Limitation: `parallel_tool_calls` has no wire field, so the router never sees it.
    sampling = _sampling(request, request.completion_limit)
    sampling.logprobs = bool(request.logprobs)
    sampling.top_logprobs = request.top_logprobs or 0
    return _encode(
        lambda: pb.GenerateRequest(
            request_id=request_id,
            messages=[_message(m) for m in request.messages],
            sampling=sampling,
            tools_json=request.raw_json("tools"),
            tool_choice_json=request.raw_json("tool_choice"),
            chat_template_kwargs_json=request.raw_json("chat_template_kwargs"),
            **_common(request),
        )
    )


def completion_to_proto(request: CompletionRequest, request_id: str) -> pb.GenerateRequest:
    """Builds the router request of a validated text completion (one prompt: text or ids)."""
    limit = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    sampling = _sampling(request, limit)
    if request.logprobs is not None:
        sampling.logprobs = True
        sampling.top_logprobs = request.logprobs
    prompt = request.single_prompt
    prompt_fields = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    return _encode(
        lambda: pb.GenerateRequest(
            request_id=request_id, sampling=sampling, **prompt_fields, **_common(request)
        )
    )


def _encode(build: Callable[[], pb.GenerateRequest]) -> pb.GenerateRequest:
    try:
        return build()
    except ValueError as exc:  # includes UnicodeEncodeError from lone surrogates
        raise invalid_request(f"the request cannot be encoded: {exc}") from exc


def _common(request: GenerationRequest) -> dict:
    return {
        "n": request.n or 1,
        "stop": request.stop_list,
        "skip_special_tokens": request.skip_special_tokens is not False,
        "include_stop_str_in_output": bool(request.include_stop_str_in_output),
    }


def _sampling(request: GenerationRequest, max_tokens: int) -> pb.SamplingParams:
    # Limitation: `SamplingParams` cannot say "unset", so an omitted temperature becomes OpenAI's
    # 1.0 here and the router cannot apply the checkpoint's recommended defaults instead.
    sampling = pb.SamplingParams(
        temperature=_default(request.temperature, 1.0),
        top_p=_default(request.top_p, 1.0),
        top_k=_default(request.top_k, 0),
        min_p=_default(request.min_p, 0.0),
        presence_penalty=_default(request.presence_penalty, 0.0),
        frequency_penalty=_default(request.frequency_penalty, 0.0),
        repetition_penalty=_default(request.repetition_penalty, 1.0),
        max_tokens=max_tokens,
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
    )
    if request.seed is not None:
        sampling.seed = request.seed
    return sampling


def _default(value: T | None, default: T) -> T:
    return default if value is None else value


def _message(message: ChatMessage) -> pb.ChatMessage:
    out = pb.ChatMessage(
        role=message.role,
        name=message.name or "",
        tool_call_id=message.tool_call_id or "",
        tool_calls=[
            pb.ToolCall(id=c.id or "", name=c.function.name, arguments=c.function.arguments_json)
            for c in message.tool_calls or []
        ],
    )
    if isinstance(message.content, str):
        out.content = message.content
    elif message.content is not None:
        out.parts.extend(_part(p) for p in message.content)
    if message.reasoning_content is not None:
        out.reasoning_content = message.reasoning_content
    return out


def _part(part: ContentPart) -> pb.ContentPart:
    if part.type == "text":
        return pb.ContentPart(type="text", text=part.text or "")
    return pb.ContentPart(type="image_url", image_url=part.url)
