"""Per-choice output processing in the router: token ids -> text -> parsed deltas.

Each choice has its own detokenizer, parser stream and stop-string matcher (choices never
share parser state). Stop strings apply to content only, never inside reasoning: a stop string
that appears in the reasoning does not end the answer.

Log-probabilities, when asked, come one per generated token (reasoning and markup included),
except the end-of-turn or stop token that ends the choice. With one tool call allowed (a named
`tool_choice`, or `parallel_tool_calls` false), the choice ends when the model starts a second.
"""

from __future__ import annotations

from proto import kimiserve_pb2 as pb
from router.prompt import Prompt
from shared.parsers.markers import MarkerTable
from shared.parsers.output import ChatOutputParser, OutputDelta
from shared.parsers.tool_calls import ToolCallDelta
from shared.tokenizer import IncrementalDetokenizer, KimiTokenizer


class StopStringMatcher:
    """Finds the first stop string in a text stream, holding back a possible partial match."""

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `matched` and drops the rest on a match
        (the stop string itself is kept only with `include_stop`)."""
        if not self.stops or self.matched:
            return "" if self.matched else text
        self._pending += text
        hits = [(i, -len(s)) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            self.matched = True
            at, minus_len = min(hits)  # the earliest match; the longest stop string there
            end = at - minus_len if self.include_stop else at
            out, self._pending = self._pending[:end], ""
            return out
        cut = len(self._pending) - self._hold
        out, self._pending = self._pending[: max(cut, 0)], self._pending[max(cut, 0) :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.matched else out


class ChoiceOutput:
    """State of one choice; `start`, `on_token` and `finish` return the `ChoiceDelta` to send."""

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
            self.stream = ChatOutputParser(
                markers,
                thinking=prompt.thinking,
                parse_tools=prompt.parse_tools,
                history_tool_calls=prompt.num_history_tool_calls,
            ).stream()
        self.stop_ids = frozenset(request.sampling.stop_token_ids) | frozenset(
            tokenizer.eos_token_ids
        )
        self.stops = StopStringMatcher(list(request.stop), request.include_stop_str_in_output)
        self.num_top_logprobs = request.sampling.top_logprobs if request.sampling.logprobs else -1
        self.max_tool_calls = prompt.max_tool_calls
        self.num_tokens = 0
        self.num_reasoning_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens the prefill worker took from its prefix cache
        self.started_tool_calls: set[int] = set()
        self.finished = False
        self.finish_reason = ""
        self._forced_output = prompt.forced_output

    def start(self) -> pb.ChoiceDelta | None:
        """What the forced start of the output (tool_choice) shows the client, once."""
        if not self._forced_output or self.stream is None:
            return None
        ids = self.tokenizer.encode(self._forced_output)
        self._forced_output = ""
        delta = self._to_proto(self.stream.feed(ids, self.tokenizer.decode(ids)), [])
        return delta if delta.tool_calls else None

    def _parse(self, token_ids: list[int], text: str) -> OutputDelta:
        if self.stream is None:
            return OutputDelta(content_text=text)
        return self.stream.feed(token_ids, text)

    def _allowed_calls(self, calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
        """The deltas of calls within the limit; a call beyond it ends the choice."""
        if not self.max_tool_calls:
            return calls
        if any(c.index >= self.max_tool_calls for c in calls) and not self.finished:
            self.finished, self.finish_reason = True, "stop"
        return [c for c in calls if c.index < self.max_tool_calls]

    def _to_proto(self, delta: OutputDelta, token_ids: list[int]) -> pb.ChoiceDelta:
        content = self.stops.feed(delta.content_text) if delta.content_text else ""
        if self.stops.matched and not self.finished:
            self.finished, self.finish_reason = True, "stop"
        calls = self._allowed_calls(delta.tool_calls)
        self.started_tool_calls.update(c.index for c in calls if c.name is not None)
        return pb.ChoiceDelta(
            index=self.index,
            content=content,
            reasoning_content=delta.reasoning_text,
            tool_calls=[
                pb.ToolCallDelta(
                    index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments
                )  # fmt: skip
                for c in calls
            ],
            token_ids=token_ids,
        )

    def _logprob_token(self, token_id: int, logprob: float) -> pb.LogprobToken:
        data = self.tokenizer.token_bytes(token_id)
        return pb.LogprobToken(token_id=token_id, token=data.decode("utf-8", errors="replace"),
                               token_bytes=data, logprob=logprob)  # fmt: skip

    def _logprobs(self, token: pb.TokenOutput) -> list[pb.PositionLogprobs]:
        if self.num_top_logprobs < 0:
            return []
        top = token.top_logprobs[: self.num_top_logprobs]
        return [pb.PositionLogprobs(
            sampled=self._logprob_token(token.token_id, token.logprob),
            top=[self._logprob_token(t.token_id, t.logprob) for t in top],
        )]  # fmt: skip

    def on_token(self, token: pb.TokenOutput) -> pb.ChoiceDelta | None:
        self.num_tokens += 1
        if self.stream is not None and self.stream.in_reasoning:
            self.num_reasoning_tokens += 1
        if token.token_id in self.stop_ids:
            return pb.ChoiceDelta(index=self.index, token_ids=[token.token_id])
        if token.token_id in self.hidden_ids:
            delta = pb.ChoiceDelta(index=self.index, token_ids=[token.token_id])
        else:
            text = self.detokenizer.feed([token.token_id])
            delta = self._to_proto(self._parse([token.token_id], text), [token.token_id])
        delta.logprobs.extend(self._logprobs(token))
        return delta

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
        complete = self._complete_tool_calls()
        out.unfinished_tool_calls.extend(sorted(self.started_tool_calls - complete))
        if not self.finish_reason:
            self.finish_reason = reason or "stop"
        if self.finish_reason == "stop" and complete and not self.stops.matched:
            self.finish_reason = "tool_calls"
        out.finish_reason = self.finish_reason
        self.finished = True
        return out

    def _complete_tool_calls(self) -> set[int]:
        """Indices of the calls sent to the client that the parser saw complete."""
        if self.stream is None:
            return set()
        return {c.index for c in self.stream.result().tool_calls} & self.started_tool_calls
