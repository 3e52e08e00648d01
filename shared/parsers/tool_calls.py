"""The `kimi_k2` tool-call parser: extract tool calls from Kimi's tool section.

    content <|tool_calls_section_begin|>
      <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|>
      ...
    <|tool_calls_section_end|> more content

Rules (identical for streaming and `parse`; the reasons are in docs/parsers.md):

* Content is the text outside tool sections, before and after them. Text inside a section but
  outside a call is dropped.
* The call id between `<|tool_call_begin|>` and `<|tool_call_argument_begin|>` is trimmed;
  the name is the id without a leading `functions.` and a trailing `:<digits>`, so
  `name:idx`, hyphenated and dotted names all work. A call with an empty name is dropped.
* The returned id is `functions.{name}:{history_tool_calls + index}` where `index` counts
  calls in this output from 0 (the stream `index` of OpenAI deltas).
* Arguments are the text up to `<|tool_call_end|>`, trimmed, passed through unvalidated;
  empty arguments become `{}`; a JSON string holding a JSON object is unwrapped once.
* A missing section end is tolerated. A call ends at `<|tool_call_end|>`, or implicitly at the
  next call or the section end; a call still open at the end of output is incomplete: its
  deltas may have been streamed, but it is not in the final result.
* A bare `<|tool_call_begin|>` outside a section opens one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Sequence

from shared.parsers.markers import Event, Marker, MarkerScanner, MarkerTable

logger = logging.getLogger(__name__)

_INDEX_SUFFIX = re.compile(r":\d+$")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A complete call. `arguments` is a string, usually JSON, not validated."""

    index: int
    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a call: the first piece of a call carries `id` and `name`
    (with `arguments == ""`), later pieces carry argument fragments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclasses.dataclass
class ToolDelta:
    content_text: str = ""
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ToolParseResult:
    content: str
    tool_calls: list[ToolCall]


def tool_name_from_id(raw_id: str) -> str:
    """`functions.billing.invoices.list:0` -> `billing.invoices.list`; `search:3` -> `search`."""
    name = raw_id.strip()
    name = name.removeprefix("functions.")
    return _INDEX_SUFFIX.sub("", name)


def count_history_tool_calls(messages: Iterable[dict]) -> int:
    """Tool calls made by assistant messages of a conversation: the start of the id counter."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def unwrap_arguments(arguments: str) -> str:
    """Undo one level of double encoding: `"{\\"a\\": 1}"` -> `{"a": 1}`; else unchanged."""
    try:
        inner = json.loads(arguments)
        if isinstance(inner, str) and isinstance(json.loads(inner), dict):
            return inner
    except ValueError:
        pass
    return arguments


class KimiK2ToolParser:
    """Factory for one request's tool-call parsing (holds only configuration)."""

    def __init__(self, markers: MarkerTable, history_tool_calls: int = 0) -> None:
        self.markers = markers
        self.history_tool_calls = history_tool_calls

    def stream(self) -> ToolCallStream:
        """A streaming parser for one sequence (one choice of a request)."""
        return ToolCallStream(self.markers, self.history_tool_calls)

    def parse(self, token_ids: Sequence[int] | None, text: str) -> ToolParseResult:
        """Non-streaming: the whole output (or the content part of it) at once."""
        stream = self.stream()
        stream.feed(token_ids, text)
        stream.finish()
        return stream.result()


@dataclasses.dataclass
class _OpenCall:
    """The call whose arguments are streaming."""

    index: int
    id: str
    name: str
    raw: str = ""  # every argument character received
    leading: bool = True  # still skipping leading whitespace
    held_ws: str = ""  # trailing whitespace not yet emitted
    whole: bool = False  # arguments start with '"': held until the call ends
    emitted: bool = False  # some argument text was streamed


class _State:
    TEXT = "text"  # outside a tool section
    SECTION = "section"  # inside a section, between calls
    CALL_ID = "call_id"  # after <|tool_call_begin|>
    ARGS = "args"  # after <|tool_call_argument_begin|>


class ToolCallStream:
    """Streaming state for one sequence: feed deltas, then `finish` once, then `result`."""

    def __init__(self, markers: MarkerTable, history_tool_calls: int = 0) -> None:
        self._scanner = MarkerScanner(markers)
        self._history = history_tool_calls
        self._state = _State.TEXT
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._num_started = 0
        self._id_text = ""
        self._call: _OpenCall | None = None

    def feed(self, token_ids: Sequence[int] | None, text: str) -> ToolDelta:
        """Add generated token ids and their detokenized text (specials kept)."""
        return self.feed_events(self._scanner.feed(token_ids, text))

    def finish(self) -> ToolDelta:
        """End of output. A call still open is incomplete and stays out of `result`."""
        delta = self.feed_events(self._scanner.finish())
        if self._call is not None:
            logger.debug("output ended inside tool call %s", self._call.id)
            self._call = None
        return delta

    def feed_events(self, events: Sequence[Event]) -> ToolDelta:
        """Add already-scanned events (e.g. the content events of the reasoning parser)."""
        delta = ToolDelta()
        for event in events:
            if isinstance(event, str):
                self._on_text(event, delta)
            else:
                self._on_marker(event, delta)
        self._content.append(delta.content_text)
        return delta

    def result(self) -> ToolParseResult:
        """Content and complete calls parsed so far."""
        return ToolParseResult(content="".join(self._content), tool_calls=list(self._calls))

    def _on_text(self, text: str, delta: ToolDelta) -> None:
        if self._state == _State.TEXT:
            delta.content_text += text
        elif self._state == _State.CALL_ID:
            self._id_text += text
        elif self._state == _State.ARGS:
            self._add_arguments(text, delta)
        # text between calls inside a section is dropped

    def _on_marker(self, marker: Marker, delta: ToolDelta) -> None:
        state = self._state
        if marker is Marker.SECTION_BEGIN:
            self._end_call(delta)
            self._state = _State.SECTION
        elif marker is Marker.CALL_BEGIN:
            self._end_call(delta)
            self._id_text = ""
            self._state = _State.CALL_ID
        elif marker is Marker.ARG_BEGIN and state == _State.CALL_ID:
            self._start_call(delta)
        elif marker is Marker.CALL_END and state in (_State.ARGS, _State.CALL_ID):
            self._end_call(delta)
            self._state = _State.SECTION
        elif marker is Marker.SECTION_END and state != _State.TEXT:
            self._end_call(delta)
            self._state = _State.TEXT
        elif marker in (Marker.THINK_BEGIN, Marker.THINK_END) and state == _State.TEXT:
            delta.content_text += marker.value  # only seen without the reasoning parser
        # any other marker is out of place and dropped

    def _start_call(self, delta: ToolDelta) -> None:
        name = tool_name_from_id(self._id_text)
        if not name:
            logger.warning("dropping a tool call without a name: %r", self._id_text)
            self._state = _State.SECTION
            return
        index = self._num_started
        self._num_started += 1
        call_id = f"functions.{name}:{self._history + index}"
        self._call = _OpenCall(index, call_id, name)
        delta.tool_calls.append(ToolCallDelta(index=index, id=call_id, name=name))
        self._state = _State.ARGS

    def _add_arguments(self, text: str, delta: ToolDelta) -> None:
        call = self._call
        call.raw += text
        if call.leading:
            text = text.lstrip()
            if not text:
                return
            call.leading = False
            # A JSON string (double-encoded arguments) is decided at the end: hold it all.
            call.whole = text.startswith('"')
        if call.whole:
            return
        # Trailing whitespace waits until more text arrives, so the pieces add up to the
        # trimmed arguments for every split.
        text = call.held_ws + text
        body = text.rstrip()
        call.held_ws = text[len(body) :]
        if body:
            call.emitted = True
            delta.tool_calls.append(ToolCallDelta(index=call.index, arguments=body))

    def _end_call(self, delta: ToolDelta) -> None:
        """Close the open call, if any, as complete."""
        call, self._call = self._call, None
        if call is None:
            return
        arguments = call.raw.strip()
        if call.whole:
            arguments = unwrap_arguments(arguments)
        elif not arguments:
            arguments = "{}"
        if call.whole or not call.emitted:
            delta.tool_calls.append(ToolCallDelta(index=call.index, arguments=arguments))
        self._calls.append(ToolCall(call.index, call.id, call.name, arguments))
