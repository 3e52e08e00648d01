"""Turns a `GenerateRequest` into prompt token ids: chat template rendering and tokenization.

`tool_choice` is applied here as well. Without a grammar in the samplers, `required` and a named
function are forced by writing the start of the tool section into the generation prompt, exactly
as the model would emit it; the output parser is primed with the same text (`forced_output`), so
it reads the continuation as the inside of a tool section (docs/parsers.md, "tool_choice").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from proto import kimiserve_pb2 as pb
from proto import vision_pb2 as vpb
from shared.chat_template import render_chat, resolve_thinking
from shared.parsers.markers import Marker
from shared.tokenizer import KimiTokenizer, split_long_input

# Roles the template has no header of its own for, and the role they render as.
ROLE_ALIASES = {"developer": "system"}
TOOL_CHOICE_MODES = ("none", "auto", "required")
# Template variables the request's own fields set; `chat_template_kwargs` cannot replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})


class InvalidRequest(ValueError):
    """The client's request is malformed; `param` names the offending field."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A request's prompt and what the output processing needs to know about it."""

    token_ids: list[int]
    text: str = ""  # the rendered prompt; "" for a prompt given as token ids
    is_chat: bool = False
    thinking: bool = False  # whether generation starts inside reasoning
    parse_tools: bool = False
    forced_output: str = ""  # the end of the prompt the output parser must read as output
    max_tool_calls: int = 0  # 0: no limit
    num_history_tool_calls: int = 0
    images: vpb.ImageRefs | None = None  # where the prefill worker finds the image embeddings


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    text: str
    thinking: bool
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "named"
    name: str = ""


def _loads(text: str, param: str, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"{param} is not valid JSON: {exc}", param) from exc


def message_to_dict(msg: pb.ChatMessage) -> dict[str, Any]:
    """One wire message as the template expects it; `developer` becomes `system`."""
    out: dict[str, Any] = {"role": ROLE_ALIASES.get(msg.role, msg.role)}
    if msg.HasField("content"):
        out["content"] = msg.content
    elif msg.parts:
        out["content"] = [
            {"type": "text", "text": p.text}
            if p.type == "text"
            else {"type": "image_url", "image_url": {"url": p.image_url}}
            for p in msg.parts
        ]
    else:
        out["content"] = None
    if msg.name:
        out["name"] = msg.name
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.HasField("reasoning_content"):
        out["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in msg.tool_calls
        ]
    return out


def parse_tool_choice(raw: Any, tools: list[dict[str, Any]]) -> ToolChoice:
    """OpenAI's `tool_choice` (unset: "auto" with tools, else "none"); 400 when it cannot hold."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str) and raw in TOOL_CHOICE_MODES:
        choice = ToolChoice(raw)
    elif isinstance(raw, dict) and raw.get("type") == "function":
        name = (raw.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("tool_choice.function.name is required", "tool_choice")
        choice = ToolChoice("named", name)
    else:
        raise InvalidRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", ...}',
            "tool_choice",
        )
    if choice.mode in ("required", "named") and not tools:
        raise InvalidRequest(f"tool_choice {choice.mode!r} needs `tools`", "tool_choice")
    names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
    if choice.mode == "named" and choice.name not in names:
        raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not in `tools`",
                             "tool_choice")  # fmt: skip
    return choice


def forced_tool_output(choice: ToolChoice, thinking: bool, first_index: int) -> str:
    """What the model would emit to start the forced tool section (appended to the prompt).

    Reasoning is closed first (empty), so the model goes straight to the call. `required` opens
    the section; a named function also opens its call, with the id the parser will return.
    """
    if choice.mode not in ("required", "named"):
        return ""
    text = Marker.THINK_END.value if thinking else ""
    text += Marker.SECTION_BEGIN.value
    if choice.mode == "named":
        text += f"{Marker.CALL_BEGIN.value}functions.{choice.name}:{first_index}"
        text += Marker.ARG_BEGIN.value
    return text


def context_length_message(context_length: int, num_tokens: int, at_least: bool = False) -> str:
    count = f"at least {num_tokens}" if at_least else str(num_tokens)
    return (
        f"This model's maximum context length is {context_length} tokens. However, your prompt "
        f"has {count} tokens."
    )


class PromptBuilder:
    """Chat rendering and tokenization. With `context_length`, tokenizing stops as soon as a
    prompt reaches it (an enormous prompt costs only the work up to there); the rest of the
    length checks are `resolve_sampling`'s."""

    def __init__(
        self, model_path: str | Path, tokenizer: KimiTokenizer, context_length: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.template = (Path(model_path) / "chat_template.jinja").read_text()
        self.context_length = context_length

    def build(self, request: pb.GenerateRequest) -> Prompt:
        if request.messages:
            return self._chat(request)
        if request.prompt_token_ids:
            return Prompt(self.check_token_ids(request.prompt_token_ids, "prompt"))
        if request.HasField("prompt"):
            token_ids = self.encode(request.prompt, "prompt")
            if not token_ids:  # there is no BOS to start from
                raise InvalidRequest("the prompt must not be empty", "prompt")
            return Prompt(token_ids, request.prompt)
        raise InvalidRequest("either messages or prompt is required", "messages")

    def encode(self, text: str, param: str) -> list[int]:
        """`tokenizer.encode(text)`, piece by piece (the tokenizer's own pieces, so the ids are
        the same); raises `InvalidRequest` once the ids reach the context length."""
        if not self.context_length:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for piece in split_long_input(text):
            ids += self.tokenizer.encode(piece)
            if len(ids) >= self.context_length:
                message = context_length_message(self.context_length, len(ids), at_least=True)
                raise InvalidRequest(message, param)
        return ids

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> list[int]:
        ids = list(token_ids)
        bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", param)
        return ids

    def render(self, messages: Sequence[pb.ChatMessage], tools_json: str, kwargs_json: str,
               add_generation_prompt: bool = True) -> RenderedChat:  # fmt: skip
        """The chat template's text for wire messages; the thinking switch resolved once."""
        kwargs = _loads(kwargs_json, "chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        tools = _loads(tools_json, "tools", [])
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", "tools")
        try:
            thinking = resolve_thinking(kwargs)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "chat_template_kwargs") from exc
        extra = {k: v for k, v in kwargs.items() if k not in ("thinking", "enable_thinking")}
        if reserved := sorted(RESERVED_TEMPLATE_VARIABLES & extra.keys()):
            raise InvalidRequest(f"chat_template_kwargs may not set {reserved[0]!r}; it comes "
                                 "from the request itself", "chat_template_kwargs")  # fmt: skip
        dicts = [message_to_dict(m) for m in messages]
        try:
            text = render_chat(self.template, dicts, tools=tools or None,
                               add_generation_prompt=add_generation_prompt, thinking=thinking,
                               **extra)  # fmt: skip
        except (jinja2.TemplateError, TypeError, ValueError, RecursionError) as exc:
            # RecursionError: values nested too deeply for the renderer (the gateway caps the
            # depth; this guards other callers of the gRPC API).
            raise InvalidRequest(f"cannot render the chat template: {exc}", "messages") from exc
        return RenderedChat(text, thinking, tools, dicts)

    def _chat(self, request: pb.GenerateRequest) -> Prompt:
        chat = self.render(request.messages, request.tools_json, request.chat_template_kwargs_json)
        choice = parse_tool_choice(
            _loads(request.tool_choice_json, "tool_choice", None), chat.tools
        )
        history_calls = sum(len(m.get("tool_calls") or []) for m in chat.messages)
        forced = forced_tool_output(choice, chat.thinking, history_calls)
        single_call = choice.mode == "named" or (
            request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
        )
        text = chat.text + forced
        return Prompt(
            token_ids=self.encode(text, "messages"),
            text=text,
            is_chat=True,
            thinking=chat.thinking,
            parse_tools=choice.mode != "none" and bool(chat.tools),
            forced_output=forced,
            max_tool_calls=1 if single_call else 0,
            num_history_tool_calls=history_calls,
        )
