"""The `kimi_k2` reasoning parser: split generated output into reasoning and content.

Grammar (spec section 10.1): in thinking mode the prompt ends with `<think>`, so the output
starts inside reasoning and `</think>` ends it; in instant mode the prompt ends with
`<think></think>` and the output is content. Rules, identical for streaming and `parse`:

* thinking on: everything up to `</think>` is reasoning. A `<think>` inside reasoning (a
  template that does not prefill it) is dropped. Output without `</think>` is all reasoning
  (truncated or stopped runs keep their text as reasoning; content stays empty).
* `<|tool_calls_section_begin|>` (or a bare `<|tool_call_begin|>`) inside reasoning ends it
  implicitly; the marker goes on to the content so the tool-call parser sees it.
* thinking off: output is content; a `<think>` before any reasoning happened opens reasoning
  (the model chose to think), otherwise think markers are dropped.
* after reasoning ends, stray `<think>` / `</think>` are dropped; tool markers found inside
  reasoning (other than the two that end it) are dropped.

`reasoning` is None when no reasoning phase happened (instant mode), else a string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shared.parsers.markers import Event, Marker, MarkerScanner, MarkerTable, render_events

_ENDS_REASONING = (Marker.SECTION_BEGIN, Marker.CALL_BEGIN)
_THINK_MARKERS = (Marker.THINK_BEGIN, Marker.THINK_END)


@dataclasses.dataclass
class ReasoningDelta:
    """What one fed delta added. `content_events` is the content with markers kept as
    events, for the tool-call parser; `content_text` is the same with markers spelled out."""

    reasoning_text: str = ""
    content_text: str = ""
    content_events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ReasoningResult:
    reasoning: str | None
    content: str


class KimiK2ReasoningParser:
    """Factory for one request's reasoning parsing (holds only configuration)."""

    def __init__(self, markers: MarkerTable, thinking: bool = True) -> None:
        self.markers = markers
        self.thinking = thinking

    def stream(self) -> ReasoningStream:
        """A streaming parser for one sequence (one choice of a request)."""
        return ReasoningStream(self.markers, self.thinking)

    def parse(self, token_ids: Sequence[int] | None, text: str) -> ReasoningResult:
        """Non-streaming: the whole output at once."""
        stream = self.stream()
        stream.feed(token_ids, text)
        stream.finish()
        return stream.result()


class ReasoningStream:
    """Streaming state for one sequence: feed deltas, then `finish` once."""

    def __init__(self, markers: MarkerTable, thinking: bool) -> None:
        self._scanner = MarkerScanner(markers)
        self._in_reasoning = thinking
        self._reasoning_started = thinking
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def feed(self, token_ids: Sequence[int] | None, text: str) -> ReasoningDelta:
        """Add generated token ids and their detokenized text (specials kept)."""
        return self.feed_events(self._scanner.feed(token_ids, text))

    def finish(self) -> ReasoningDelta:
        """End of output: flush held-back text."""
        return self.feed_events(self._scanner.finish())

    def feed_events(self, events: Sequence[Event]) -> ReasoningDelta:
        """Add already-scanned events (used when a `MarkerScanner` is shared)."""
        delta = ReasoningDelta()
        for event in events:
            self._step(event, delta)
        delta.content_text = render_events(delta.content_events)
        self._reasoning.append(delta.reasoning_text)
        self._content.append(delta.content_text)
        return delta

    def result(self) -> ReasoningResult:
        """Everything parsed so far, accumulated."""
        reasoning = "".join(self._reasoning) if self._reasoning_started else None
        return ReasoningResult(reasoning=reasoning, content="".join(self._content))

    @property
    def in_reasoning(self) -> bool:
        """Whether new text would be reasoning (the router skips stop strings then)."""
        return self._in_reasoning

    def _step(self, event: Event, delta: ReasoningDelta) -> None:
        if self._in_reasoning:
            if isinstance(event, str):
                delta.reasoning_text += event
            elif event is Marker.THINK_END:
                self._in_reasoning = False
            elif event in _ENDS_REASONING:
                self._in_reasoning = False
                delta.content_events.append(event)
            # any other marker inside reasoning is dropped
        elif event is Marker.THINK_BEGIN and not self._reasoning_started:
            self._in_reasoning = self._reasoning_started = True
        elif event not in _THINK_MARKERS:
            delta.content_events.append(event)
