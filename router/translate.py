"""OpenAI request models -> the router's `GenerateRequest`.

The gateway only moves fields: templating, tokenizing and parsing happen in the router. Tools,
`tool_choice` and `chat_template_kwargs` travel as the client's JSON text. Sampling fields the
client left out stay unset on the wire; the router applies the model's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

from proto import kimiserve_pb2 as pb
from router.errors import invalid_request
from router.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
)

# Sampling fields that travel unset when the client leaves them out.
OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)

# OpenAI's default for text completions; chat completions default to "until the context ends".
DEFAULT_COMPLETION_MAX_TOKENS = 16


def chat_to_proto(request: ChatCompletionRequest, request_id: str) -> pb.GenerateRequest:
    """Builds the router request of a validated chat completion; 400 on unencodable text."""
    sampling = _sampling(request, request.completion_limit)
    sampling.logprobs = bool(request.logprobs)
    sampling.top_logprobs = request.top_logprobs or 0
    generate = _encode(
        lambda: pb.GenerateRequest(
            request_id=request_id,
            messages=[_message(m) for m in request.messages],
            sampling=sampling,
            tools_json=request.raw_json("tools"),
            tool_choice_json=request.raw_json("tool_choice"),
            chat_template_kwargs_json=request.raw_json("chat_template_kwargs"),
            max_tokens_param=request.completion_limit_param,
            **_common(request),
        )
    )
    if request.parallel_tool_calls is not None:
        generate.parallel_tool_calls = request.parallel_tool_calls
    return generate


def tokenize_to_proto(request: TokenizeRequest) -> pb.TokenizeRequest:
    """The router's `Tokenize` request of a validated /tokenize body."""

    def build() -> pb.TokenizeRequest:
        out = pb.TokenizeRequest(
            add_generation_prompt=request.add_generation_prompt,
            return_token_strs=request.return_token_strs,
        )
        if request.prompt is not None:
            out.prompt = request.prompt
            return out
        out.messages.extend(_message(m) for m in request.messages or [])
        out.tools_json = request.raw_json("tools")
        out.chat_template_kwargs_json = request.raw_json("chat_template_kwargs")
        return out

    return _encode(build)


def detokenize_to_proto(request: DetokenizeRequest) -> pb.DetokenizeRequest:
    return pb.DetokenizeRequest(tokens=request.tokens)


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
            request_id=request_id,
            sampling=sampling,
            max_tokens_param="max_tokens",
            **prompt_fields,
            **_common(request),
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
    sampling = pb.SamplingParams(
        max_tokens=max_tokens,
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
    )
    for name in OPTIONAL_SAMPLING_FIELDS:
        value = getattr(request, name)
        if value is not None:
            setattr(sampling, name, value)
    if request.grammar_kind:  # the router checks the schema and sets where the grammar starts
        sampling.grammar.kind = request.grammar_kind
        sampling.grammar.schema_json = request.response_format.schema_json
    return sampling


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
