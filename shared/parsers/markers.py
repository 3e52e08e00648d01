"""Find Kimi's output markers (think and tool-call tokens) in a stream of generated output.

A `MarkerScanner` turns (token_ids, text) deltas into events: plain text pieces (`str`) and
`Marker`s. It works in one of two modes, fixed by its `MarkerTable`:

* id mode (`MarkerTable.from_tokenizer`): a marker is a special token id. Its text in the
  detokenized stream is matched to the id, so plain text that merely spells a marker is not a
  marker. Precondition: the text deltas are the detokenized ids with special tokens kept; the
  text may lag behind the ids (then the scanner waits) but never runs ahead of them.
* text mode (`MarkerTable.text_only()`): a marker is its spelling in the text, for callers
  that only have text. A partial spelling at the end of a delta is held back.

Either way the events do not depend on how the output was split into deltas: markers are
atomic and only the cut points between text pieces move.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)


class Marker(enum.Enum):
    """A structural token of Kimi's output grammar (spec section 10.1)."""

    THINK_BEGIN = "<think>"
    THINK_END = "</think>"
    SECTION_BEGIN = "<|tool_calls_section_begin|>"
    SECTION_END = "<|tool_calls_section_end|>"
    CALL_BEGIN = "<|tool_call_begin|>"
    ARG_BEGIN = "<|tool_call_argument_begin|>"
    CALL_END = "<|tool_call_end|>"
    STOP = "<|im_end|>"  # also `[EOS]`; dropped by the scanner


Event = str | Marker

# Text-mode spellings. The singular section spellings are tolerated as vLLM does; `[EOS]` is
# left out because plain text may well contain it.
TEXT_SPELLINGS: dict[str, Marker] = {m.value: m for m in Marker}
TEXT_SPELLINGS["<|tool_call_section_begin|>"] = Marker.SECTION_BEGIN
TEXT_SPELLINGS["<|tool_call_section_end|>"] = Marker.SECTION_END

# Special tokens (by token string) that id mode recognises.
TOKEN_MARKERS: dict[str, Marker] = {m.value: m for m in Marker}
TOKEN_MARKERS["[EOS]"] = Marker.STOP


class SpecialTokenLookup(Protocol):
    def token_id(self, token: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class MarkerTable:
    """Which ids (id mode) or spellings (text mode) are markers."""

    by_id: Mapping[int, Marker]
    id_text: Mapping[int, str]

    @classmethod
    def from_tokenizer(cls, tokenizer: SpecialTokenLookup) -> MarkerTable:
        """Id mode, with the marker ids of `tokenizer` (a `shared.tokenizer.KimiTokenizer`)."""
        ids = {token: tokenizer.token_id(token) for token in TOKEN_MARKERS}
        return cls(
            by_id={ids[t]: marker for t, marker in TOKEN_MARKERS.items()},
            id_text={token_id: token for token, token_id in ids.items()},
        )

    @classmethod
    def text_only(cls) -> MarkerTable:
        """Text mode: markers are found by their spelling."""
        return cls(by_id={}, id_text={})

    @property
    def uses_ids(self) -> bool:
        return bool(self.by_id)


_SPELLING_RE = re.compile("|".join(re.escape(s) for s in TEXT_SPELLINGS))
_SPELLING_PREFIXES = frozenset(s[:k] for s in TEXT_SPELLINGS for k in range(1, len(s)))
_MAX_SPELLING = max(len(s) for s in TEXT_SPELLINGS)


def render_events(events: Sequence[Event]) -> str:
    """Events back to text, markers as their canonical spelling."""
    return "".join(e if isinstance(e, str) else e.value for e in events)


class MarkerScanner:
    """Splits one generation's output into text pieces and markers; one instance per
    sequence. `STOP` markers are dropped. Call `finish` once at the end."""

    def __init__(self, table: MarkerTable) -> None:
        self._table = table
        self._buffer = ""
        self._pending: deque[int] = deque()  # id mode: marker ids whose text has not arrived

    def feed(self, token_ids: Sequence[int] | None, text: str) -> list[Event]:
        """Add one delta; return the events it completes."""
        self._buffer += text
        if self._table.uses_ids:
            self._pending.extend(i for i in token_ids or () if i in self._table.by_id)
            return self._drain_ids()
        return self._drain_text(final=False)

    def finish(self) -> list[Event]:
        """Flush: held-back text comes out as text."""
        if not self._table.uses_ids:
            return self._drain_text(final=True)
        events = self._drain_ids()
        if self._pending:
            # The caller's text lacked these markers (e.g. decoded with specials skipped):
            # place them after the remaining text rather than lose them.
            logger.warning("%d marker tokens never appeared in the text", len(self._pending))
            events += self._take_text(len(self._buffer))
            events += [self._table.by_id[i] for i in self._pending]
            self._pending.clear()
        return [e for e in events if e is not Marker.STOP]

    def _drain_ids(self) -> list[Event]:
        events: list[Event] = []
        while self._pending:
            spelling = self._table.id_text[self._pending[0]]
            at = self._buffer.find(spelling)
            if at < 0:
                return events  # text lags the ids: wait for the marker's text
            events += self._take_text(at)
            self._buffer = self._buffer[len(spelling) :]
            marker = self._table.by_id[self._pending.popleft()]
            if marker is not Marker.STOP:
                events.append(marker)
        events += self._take_text(len(self._buffer))
        return events

    def _drain_text(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while match := _SPELLING_RE.search(self._buffer):
            events += self._take_text(match.start())
            self._buffer = self._buffer[match.end() - match.start() :]
            marker = TEXT_SPELLINGS[match.group()]
            if marker is not Marker.STOP:
                events.append(marker)
        keep = 0 if final else _partial_spelling_len(self._buffer)
        events += self._take_text(len(self._buffer) - keep)
        return events

    def _take_text(self, length: int) -> list[Event]:
        piece, self._buffer = self._buffer[:length], self._buffer[length:]
        return [piece] if piece else []


def _partial_spelling_len(text: str) -> int:
    """Length of the longest suffix of `text` that could still grow into a spelling."""
    for k in range(min(len(text), _MAX_SPELLING - 1), 0, -1):
        if text[-k:] in _SPELLING_PREFIXES:
            return k
    return 0
