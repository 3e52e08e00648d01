"""Turns a `GenerateRequest` into prompt token ids: chat template rendering and tokenization."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jinja2

from proto import kimiserve_pb2 as pb
from shared.chat_template import render_chat, resolve_thinking
from shared.tokenizer import KimiTokenizer


class InvalidRequest(ValueError):
    """The client's request is malformed; `param` names the offending field."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    thinking: bool  # whether generation starts inside reasoning
    tools: list[dict[str, Any]]
    tool_choice: Any
    num_history_tool_calls: int
    is_chat: bool


def _loads(text: str, param: str, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{param} is not valid JSON: {exc}", param) from exc


def message_to_dict(msg: pb.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role}
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


class PromptBuilder:
    def __init__(self, model_path: str | Path, tokenizer: KimiTokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = (Path(model_path) / "chat_template.jinja").read_text()

    def build(self, request: pb.GenerateRequest) -> Prompt:
        if request.messages:
            return self._chat(request)
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", "prompt")
            return Prompt(ids, False, [], "none", 0, False)
        if request.HasField("prompt"):
            return Prompt(self.tokenizer.encode(request.prompt), False, [], "none", 0, False)
        raise InvalidRequest("either messages or prompt is required", "messages")

    def _chat(self, request: pb.GenerateRequest) -> Prompt:
        kwargs = _loads(request.chat_template_kwargs_json, "chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        tools = _loads(request.tools_json, "tools", [])
        tool_choice = _loads(request.tool_choice_json, "tool_choice", "auto")
        try:
            thinking = resolve_thinking(kwargs)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "chat_template_kwargs") from exc
        extra = {k: v for k, v in kwargs.items() if k not in ("thinking", "enable_thinking")}
        messages = [message_to_dict(m) for m in request.messages]
        try:
            text = render_chat(self.template, messages, tools=tools or None,
                               add_generation_prompt=True, thinking=thinking, **extra)  # fmt: skip
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"cannot render the chat template: {exc}", "messages") from exc
        history_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        return Prompt(
            self.tokenizer.encode(text), thinking, tools, tool_choice, history_calls, True
        )
