"""Router `GenerateChunk`s -> OpenAI response objects and server-sent events.

`Collector` accumulates a whole stream for a non-streaming answer; the stream writers turn each
chunk into events as it arrives. Both apply the same rules, so the two paths agree:
- choices are keyed by `ChoiceDelta.index`; each keeps its own text, reasoning and tool calls;
- tool-call deltas accumulate per tool-call `index` (the first delta of a call carries its id and
  name, later ones append arguments);
- a choice that produced tool calls and stopped normally finishes with "tool_calls";
- usage comes from the last chunk that carried it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from proto import kimiserve_pb2 as pb

DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


def usage_dict(usage: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_reason(reason: str, has_tool_calls: bool) -> str | None:
    if has_tool_calls and reason == "stop":
        return "tool_calls"
    return reason or None


@dataclasses.dataclass
class _ToolCallState:
    id: str = ""
    name: str = ""
    arguments: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": "function", "function": function}


@dataclasses.dataclass
class _ChoiceState:
    content: list[str] = dataclasses.field(default_factory=list)
    reasoning: list[str] = dataclasses.field(default_factory=list)
    tool_calls: dict[int, _ToolCallState] = dataclasses.field(default_factory=dict)
    finish_reason: str = ""

    def add(self, delta: pb.ChoiceDelta) -> None:
        self.content.append(delta.content)
        self.reasoning.append(delta.reasoning_content)
        for call_delta in delta.tool_calls:
            call = self.tool_calls.setdefault(call_delta.index, _ToolCallState())
            call.id = call.id or call_delta.id
            call.name = call.name or call_delta.name
            call.arguments.append(call_delta.arguments)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) or None,
            "reasoning_content": "".join(self.reasoning) or None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].as_dict() for i in sorted(self.tool_calls)]
        return message

    def final_reason(self) -> str | None:
        return finish_reason(self.finish_reason, bool(self.tool_calls))


class Collector:
    """Accumulates one router stream into a `chat.completion` or `text_completion` object.

    Limitation: `ChoiceDelta` carries no log-probabilities, so every choice answers
    `"logprobs": null` even when the client asked for them; the wire message needs a field first.
    """

    def __init__(self, n: int) -> None:
        self._choices = {i: _ChoiceState() for i in range(n)}
        self._usage = pb.Usage()

    def add(self, chunk: pb.GenerateChunk) -> None:
        for delta in chunk.choices:
            self._choices.setdefault(delta.index, _ChoiceState()).add(delta)
        if chunk.HasField("usage"):
            self._usage.CopyFrom(chunk.usage)

    def chat_completion(self, request_id: str, created: int, model: str) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": c.message(),
                "logprobs": None,
                "finish_reason": c.final_reason(),
            }
            for i, c in sorted(self._choices.items())
        ]
        return self._envelope(request_id, "chat.completion", created, model, choices)

    def text_completion(
        self, request_id: str, created: int, model: str, echo: str
    ) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": echo + "".join(c.reasoning) + "".join(c.content),
                "logprobs": None,
                "finish_reason": c.final_reason(),
            }
            for i, c in sorted(self._choices.items())
        ]
        return self._envelope(request_id, "text_completion", created, model, choices)

    def _envelope(
        self, request_id: str, kind: str, created: int, model: str, choices: list
    ) -> dict:
        return {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage_dict(self._usage),
        }


class _StreamWriter:
    """Shared framing of streamed chunks: envelope, optional usage chunk, `[DONE]`."""

    object_name = ""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._header = {
            "id": request_id,
            "object": self.object_name,
            "created": created,
            "model": model,
        }
        self._include_usage = include_usage
        self._usage = pb.Usage()
        self._has_tool_calls: set[int] = set()

    def events(self, chunk: pb.GenerateChunk) -> list[bytes]:
        """The events of one router chunk, in order: deltas per choice, then finish reasons."""
        if chunk.HasField("usage"):
            self._usage.CopyFrom(chunk.usage)
        events = []
        for delta in chunk.choices:
            if delta.tool_calls:
                self._has_tool_calls.add(delta.index)
            events.extend(self._choice_events(delta))
        return events

    def finish(self) -> list[bytes]:
        """The usage chunk (when asked for, with empty `choices`) and `[DONE]`."""
        if not self._include_usage:
            return [DONE_EVENT]
        return [sse({**self._header, "choices": [], "usage": usage_dict(self._usage)}), DONE_EVENT]

    def _event(self, choice: dict[str, Any]) -> bytes:
        payload = {**self._header, "choices": [choice]}
        if self._include_usage:
            payload["usage"] = None
        return sse(payload)

    def _finish_reason(self, delta: pb.ChoiceDelta) -> str | None:
        return finish_reason(delta.finish_reason, delta.index in self._has_tool_calls)

    def _choice_events(self, delta: pb.ChoiceDelta) -> list[bytes]:
        raise NotImplementedError


class ChatStreamWriter(_StreamWriter):
    """`chat.completion.chunk` events: a role chunk per choice first, then deltas."""

    object_name = "chat.completion.chunk"

    def start(self, n: int) -> list[bytes]:
        role = {"role": "assistant", "content": ""}
        return [self._chat_event(i, role, None) for i in range(n)]

    def _choice_events(self, delta: pb.ChoiceDelta) -> list[bytes]:
        body: dict[str, Any] = {}
        if delta.reasoning_content:
            body["reasoning_content"] = delta.reasoning_content
        if delta.content:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = [_tool_call_delta(c) for c in delta.tool_calls]
        events = [self._chat_event(delta.index, body, None)] if body else []
        if delta.finish_reason:
            events.append(self._chat_event(delta.index, {}, self._finish_reason(delta)))
        return events

    def _chat_event(self, index: int, body: dict[str, Any], reason: str | None) -> bytes:
        return self._event(
            {"index": index, "delta": body, "logprobs": None, "finish_reason": reason}
        )


class CompletionStreamWriter(_StreamWriter):
    """`text_completion` events; with `echo`, the prompt opens each choice."""

    object_name = "text_completion"

    def start(self, n: int, echo: str) -> list[bytes]:
        return [self._text_event(i, echo, None) for i in range(n)] if echo else []

    def _choice_events(self, delta: pb.ChoiceDelta) -> list[bytes]:
        text = delta.reasoning_content + delta.content
        events = [self._text_event(delta.index, text, None)] if text else []
        if delta.finish_reason:
            events.append(self._text_event(delta.index, "", self._finish_reason(delta)))
        return events

    def _text_event(self, index: int, text: str, reason: str | None) -> bytes:
        return self._event(
            {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        )


def _tool_call_delta(delta: pb.ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": delta.index}
    if delta.id:
        out["id"] = delta.id
        out["type"] = "function"
    function = {"name": delta.name} if delta.name else {}
    function["arguments"] = delta.arguments
    out["function"] = function
    return out
