"""Reasoning and tool-call parsing together: what the router runs on each generated sequence.

    parser = ChatOutputParser(
        MarkerTable.from_tokenizer(tokenizer),
        thinking=resolve_thinking(request.chat_template_kwargs),
        parse_tools=bool(request.tools),
        history_tool_calls=count_history_tool_calls(request.messages),
    )
    stream = parser.stream()              # one per choice (n > 1 needs n streams)
    for token_ids, text in deltas:        # text from IncrementalDetokenizer, specials kept
        delta = stream.feed(token_ids, text)
    delta = stream.finish()
    final = stream.result()               # == parser.parse(all_ids, all_text)

The result of `stream.result()` is the same for every way the output is split into deltas,
and equals `parse` on the whole output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shared.parsers.markers import MarkerScanner, MarkerTable
from shared.parsers.reasoning import ReasoningDelta, ReasoningStream
from shared.parsers.tool_calls import ToolCall, ToolCallDelta, ToolCallStream


@dataclasses.dataclass
class OutputDelta:
    reasoning_text: str = ""
    content_text: str = ""
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """`reasoning` is None when no reasoning phase happened; `content` may be ""."""

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]


class ChatOutputParser:
    """Factory for one request's output parsing (holds only configuration)."""

    def __init__(
        self,
        markers: MarkerTable,
        *,
        thinking: bool = True,
        parse_tools: bool = True,
        history_tool_calls: int = 0,
    ) -> None:
        self.markers = markers
        self.thinking = thinking
        self.parse_tools = parse_tools
        self.history_tool_calls = history_tool_calls

    def stream(self) -> ChatOutputStream:
        return ChatOutputStream(self)

    def parse(self, token_ids: Sequence[int] | None, text: str) -> ParsedOutput:
        """Non-streaming: the whole output at once."""
        stream = self.stream()
        stream.feed(token_ids, text)
        stream.finish()
        return stream.result()


class ChatOutputStream:
    """One sequence's streaming state. Without `parse_tools`, tool markup stays in the
    content as text."""

    def __init__(self, config: ChatOutputParser) -> None:
        self._scanner = MarkerScanner(config.markers)
        self._reasoning = ReasoningStream(config.markers, config.thinking)
        self._tools = (
            ToolCallStream(config.markers, config.history_tool_calls)
            if config.parse_tools
            else None
        )

    @property
    def in_reasoning(self) -> bool:
        """Whether the output is currently inside reasoning (stop strings do not apply)."""
        return self._reasoning.in_reasoning

    def feed(self, token_ids: Sequence[int] | None, text: str) -> OutputDelta:
        """Add generated token ids and their detokenized text (specials kept)."""
        return self._combine(self._reasoning.feed_events(self._scanner.feed(token_ids, text)))

    def finish(self) -> OutputDelta:
        """End of output: flush everything held back."""
        delta = self._combine(self._reasoning.feed_events(self._scanner.finish()))
        if self._tools is not None:
            tail = self._tools.finish()
            delta.content_text += tail.content_text
            delta.tool_calls += tail.tool_calls
        return delta

    def result(self) -> ParsedOutput:
        """Reasoning, content and complete tool calls parsed so far."""
        reasoning = self._reasoning.result()
        if self._tools is None:
            return ParsedOutput(reasoning.reasoning, reasoning.content, [])
        tools = self._tools.result()
        return ParsedOutput(reasoning.reasoning, tools.content, tools.tool_calls)

    def _combine(self, part: ReasoningDelta) -> OutputDelta:
        if self._tools is None:
            return OutputDelta(part.reasoning_text, part.content_text)
        tools = self._tools.feed_events(part.content_events)
        return OutputDelta(part.reasoning_text, tools.content_text, tools.tool_calls)
