"""Router `GenerateChunk`s -> OpenAI response objects and server-sent events.

`Collector` accumulates a whole stream for a non-streaming answer; the stream writers turn each
chunk into events as it arrives. Both apply the same rules, so the two paths agree:
- choices are keyed by `ChoiceDelta.index`; each keeps its own text, reasoning and tool calls;
- tool-call deltas accumulate per tool-call `index` (the first delta of a call carries its id and
  name, later ones append arguments);
- a choice that produced tool calls and stopped normally finishes with "tool_calls";
- a tool call the router reports unfinished (output cut off inside it) has been streamed but is
  left out of the non-streaming answer;
- log-probabilities, when asked, list every generated token in order (chat:
  `logprobs.content`; text completions: the legacy `tokens` / `token_logprobs` lists);
- usage comes from the last chunk that carried it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from proto import kimiserve_pb2 as pb

DONE_EVENT = b"data: [DONE]\n\n"
# JSON has no -inf: a log-probability below this is sent as this (vLLM does the same).
MIN_LOGPROB = -9999.0


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


def _logprob(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


def _token_logprob(token: pb.LogprobToken) -> dict[str, Any]:
    return {
        "token": token.token,
        "logprob": _logprob(token.logprob),
        "bytes": list(token.token_bytes),
    }


def chat_logprobs(positions: list[pb.PositionLogprobs]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object for generated positions."""
    content = [
        {**_token_logprob(p.sampled), "top_logprobs": [_token_logprob(t) for t in p.top]}
        for p in positions
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(positions: list[pb.PositionLogprobs], offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object; `offset` is the text offset of the first token."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    out["text_offset"] = []
    for position in positions:
        out["tokens"].append(position.sampled.token)
        out["token_logprobs"].append(_logprob(position.sampled.logprob))
        out["top_logprobs"].append({t.token: _logprob(t.logprob) for t in position.top})
        out["text_offset"].append(offset)
        offset += len(position.sampled.token)
    return out


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
    logprobs: list[pb.PositionLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str = ""

    def add(self, delta: pb.ChoiceDelta) -> None:
        self.content.append(delta.content)
        self.reasoning.append(delta.reasoning_content)
        for call_delta in delta.tool_calls:
            call = self.tool_calls.setdefault(call_delta.index, _ToolCallState())
            call.id = call.id or call_delta.id
            call.name = call.name or call_delta.name
            call.arguments.append(call_delta.arguments)
        for index in delta.unfinished_tool_calls:
            self.tool_calls.pop(index, None)
        self.logprobs.extend(delta.logprobs)
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
    """Accumulates one router stream into a `chat.completion` or `text_completion` object;
    `logprobs` says whether the client asked for log-probabilities."""

    def __init__(self, n: int, logprobs: bool = False) -> None:
        self._choices = {i: _ChoiceState() for i in range(n)}
        self._usage = pb.Usage()
        self._logprobs = logprobs

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
                "logprobs": chat_logprobs(c.logprobs) if self._logprobs else None,
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
                "logprobs": completion_logprobs(c.logprobs, len(echo)) if self._logprobs else None,
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

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool,
                 logprobs: bool = False) -> None:  # fmt: skip
        self._logprobs = logprobs
        self._header = {
            "id": request_id,
            "object": self.object_name,
            "created": created,
            "model": model,
        }
        self._include_usage = include_usage
        self._usage = pb.Usage()
        self._tool_calls: dict[int, set[int]] = {}  # per choice: indices of its tool calls

    def events(self, chunk: pb.GenerateChunk) -> list[bytes]:
        """The events of one router chunk, in order: deltas per choice, then finish reasons."""
        if chunk.HasField("usage"):
            self._usage.CopyFrom(chunk.usage)
        events = []
        for delta in chunk.choices:
            calls = self._tool_calls.setdefault(delta.index, set())
            calls.update(c.index for c in delta.tool_calls)
            calls.difference_update(delta.unfinished_tool_calls)
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
        return finish_reason(delta.finish_reason, bool(self._tool_calls.get(delta.index)))

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
        logprobs = chat_logprobs(list(delta.logprobs)) if self._logprobs else None
        events = []
        if body or (logprobs and delta.logprobs):
            events.append(self._chat_event(delta.index, body, None, logprobs))
        if delta.finish_reason:
            events.append(self._chat_event(delta.index, {}, self._finish_reason(delta)))
        return events

    def _chat_event(self, index: int, body: dict[str, Any], reason: str | None,
                    logprobs: dict[str, Any] | None = None) -> bytes:  # fmt: skip
        return self._event(
            {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": reason}
        )


class CompletionStreamWriter(_StreamWriter):
    """`text_completion` events; with `echo`, the prompt opens each choice."""

    object_name = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}  # text offset of each choice's next token

    def start(self, n: int, echo: str) -> list[bytes]:
        self._offsets = dict.fromkeys(range(n), len(echo))
        return [self._text_event(i, echo, None) for i in range(n)] if echo else []

    def _choice_events(self, delta: pb.ChoiceDelta) -> list[bytes]:
        text = delta.reasoning_content + delta.content
        logprobs = None
        if self._logprobs and delta.logprobs:
            offset = self._offsets.get(delta.index, 0)
            logprobs = completion_logprobs(list(delta.logprobs), offset)
            self._offsets[delta.index] = offset + sum(len(t) for t in logprobs["tokens"])
        events = [self._text_event(delta.index, text, None, logprobs)] if text or logprobs else []
        if delta.finish_reason:
            events.append(self._text_event(delta.index, "", self._finish_reason(delta)))
        return events

    def _text_event(self, index: int, text: str, reason: str | None,
                    logprobs: dict[str, Any] | None = None) -> bytes:  # fmt: skip
        return self._event(
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
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
