"""Per-choice output processing in the router: token ids -> text -> parsed deltas.

Each choice has its own detokenizer, parser stream and stop-string matcher (choices never
share parser state). Stop strings apply to content only, never inside reasoning: a stop string
that appears in the reasoning does not end the answer.
"""

from __future__ import annotations

from proto import kimiserve_pb2 as pb
from router.prompt import Prompt
from shared.parsers.markers import MarkerTable
from shared.parsers.output import ChatOutputParser, OutputDelta
from shared.tokenizer import IncrementalDetokenizer, KimiTokenizer


class StopStringMatcher:
    """Finds the first stop string in a text stream, holding back a possible partial match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `matched` and drops the rest on a match."""
        if not self.stops or self.matched:
            return "" if self.matched else text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        cut = len(self._pending) - self._hold
        out, self._pending = self._pending[: max(cut, 0)], self._pending[max(cut, 0) :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.matched else out


class ChoiceOutput:
    """State of one choice; `on_token` and `finish` return the `ChoiceDelta` to send, if any."""

    def __init__(self, index: int, tokenizer: KimiTokenizer, markers: MarkerTable,
                 prompt: Prompt, request: pb.GenerateRequest) -> None:  # fmt: skip
        self.index = index
        self.tokenizer = tokenizer
        # Special tokens other than the parsers' markers are dropped from the text when asked.
        self.hidden_ids = frozenset(
            i for i in range(tokenizer.num_base_tokens, tokenizer.vocab_size)
            if request.skip_special_tokens and tokenizer.is_skippable(i) and i not in markers.by_id
        )  # fmt: skip
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stream = None
        if prompt.is_chat:
            parse_tools = bool(prompt.tools) and prompt.tool_choice != "none"
            self.stream = ChatOutputParser(
                markers,
                thinking=prompt.thinking,
                parse_tools=parse_tools,
                history_tool_calls=prompt.num_history_tool_calls,
            ).stream()
        self.stop_ids = frozenset(request.sampling.stop_token_ids) | frozenset(
            tokenizer.eos_token_ids
        )
        self.stops = StopStringMatcher(list(request.stop))
        self.num_tokens = 0
        self.num_reasoning_tokens = 0
        self.num_tool_calls = 0
        self.finished = False
        self.finish_reason = ""

    def _parse(self, token_ids: list[int], text: str) -> OutputDelta:
        if self.stream is None:
            return OutputDelta(content_text=text)
        return self.stream.feed(token_ids, text)

    def _to_proto(self, delta: OutputDelta, token_ids: list[int]) -> pb.ChoiceDelta:
        content = self.stops.feed(delta.content_text) if delta.content_text else ""
        if self.stops.matched and not self.finished:
            self.finished, self.finish_reason = True, "stop"
        self.num_tool_calls += sum(1 for c in delta.tool_calls if c.name is not None)
        return pb.ChoiceDelta(
            index=self.index,
            content=content,
            reasoning_content=delta.reasoning_text,
            tool_calls=[
                pb.ToolCallDelta(
                    index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments
                )  # fmt: skip
                for c in delta.tool_calls
            ],
            token_ids=token_ids,
        )

    def on_token(self, token: pb.TokenOutput) -> pb.ChoiceDelta | None:
        self.num_tokens += 1
        if self.stream is not None and self.stream.in_reasoning:
            self.num_reasoning_tokens += 1
        if token.token_id in self.stop_ids or token.token_id in self.hidden_ids:
            return pb.ChoiceDelta(index=self.index, token_ids=[token.token_id])
        text = self.detokenizer.feed([token.token_id])
        return self._to_proto(self._parse([token.token_id], text), [token.token_id])

    def finish(self, delta: pb.ChoiceDelta | None, reason: str) -> pb.ChoiceDelta:
        """Flushes everything held back and sets the finish reason (once)."""
        out = delta or pb.ChoiceDelta(index=self.index)
        tail = self.detokenizer.flush()
        parsed = self._parse([], tail) if tail else OutputDelta()
        if self.stream is not None:
            end = self.stream.finish()
            parsed.reasoning_text += end.reasoning_text
            parsed.content_text += end.content_text
            parsed.tool_calls += end.tool_calls
        extra = self._to_proto(parsed, [])
        out.content += extra.content + self.stops.flush()
        out.reasoning_content += extra.reasoning_content
        out.tool_calls.extend(extra.tool_calls)
        if not self.finish_reason:
            self.finish_reason = reason or "stop"
        if self.finish_reason == "stop" and self.num_tool_calls and not self.stops.matched:
            self.finish_reason = "tool_calls"
        out.finish_reason = self.finish_reason
        self.finished = True
        return out
