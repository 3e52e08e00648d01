"""Constrained decoding (`response_format`) with xgrammar: compiled grammars and per-request state.

A `GrammarSpec` (in `SamplingConfig.grammar`) names what the output must be: any JSON object
(`json_object`) or JSON that follows a schema (`json_schema`, in xgrammar's strict mode: no
properties or items beyond those the schema declares). A worker compiles it once against
the tokenizer's vocabulary (`GrammarCache`, an LRU by spec) and keeps one `GrammarState` per
request, which masks a row of logits before sampling and advances with every emitted token.

Reasoning comes first: with `reasoning_end_id` set, the output is free text up to and including
that token (`</think>`), and only then does the grammar apply. Where the grammar has ended, or
cannot go on (a schema that admits nothing more), only the request's stop tokens are allowed.

xgrammar imports transformers (about a second), so it is imported on first use: a worker that
never sees a constrained request never pays for it.

Threads: `GrammarCache` is shared by gRPC handler threads; a `GrammarState` belongs to one
request and is touched by one thread at a time (its handler, then the engine loop).
"""

from __future__ import annotations

import collections
import importlib
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from shared.sampling import GrammarSpec

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
KINDS = (JSON_OBJECT, JSON_SCHEMA)
# Whitespace between JSON tokens is free, as in vLLM and SGLang, but at most this many characters
# at a time: without a bound a model (random weights always) can emit blanks forever. 32 still
# lets pretty-printed JSON nest 15 levels deep at an indent of 2.
MAX_WHITESPACE = 32
# Limitation: xgrammar lowers a string with `minLength`/`maxLength` to repetitions of the first
# class below, which admits raw control characters (all of U+0000-U+001F but CR and LF) and no
# escapes. JSON forbids raw control characters in strings, so strict parsers would reject such
# output; `json_grammar` swaps in JSON's unescaped-character class. Escapes stay unreachable in
# those strings (valid JSON, less expressive). Drop this when xgrammar's bounded strings follow
# JSON's string rules.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# xgrammar's C++ log prefix: "[time] file.cc:line: " and "Check failed: (cond) is false: ".
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)?(\S+\.cc:\d+:\s*)?(Check failed: .*? is false:\s*)?")


class GrammarError(ValueError):
    """The spec cannot be compiled (an unknown kind, or a schema xgrammar cannot enforce)."""


def _xgr() -> ModuleType:
    return importlib.import_module("xgrammar")


def check_spec(kind: str, schema_json: str) -> None:
    """Converts the spec to a grammar without a vocabulary (milliseconds): raises
    `GrammarError` with xgrammar's reason when a worker could not compile it."""
    if kind not in KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == JSON_SCHEMA:
        json_grammar(kind, schema_json)


def json_grammar(kind: str, schema_json: str) -> Any:
    """The `xgrammar.Grammar` of a spec (no vocabulary needed); raises `GrammarError`.

    `json_object` is an object with any properties, as OpenAI's name says (xgrammar's builtin
    JSON grammar would also take a top-level array); `json_schema` is strict."""
    xgr = _xgr()
    any_object = kind == JSON_OBJECT
    schema = '{"type": "object"}' if any_object else schema_json
    try:
        grammar = xgr.Grammar.from_json_schema(
            schema, strict_mode=not any_object, max_whitespace_cnt=MAX_WHITESPACE
        )
        text = str(grammar)
        if _BOUNDED_STRING_CHAR in text:
            grammar = xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
    except (RuntimeError, ValueError) as exc:
        raise GrammarError(_reason(exc)) from exc
    return grammar


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ log prefix (time, source file and line, check)."""
    return _LOG_PREFIX.sub("", str(exc).strip())


def vocabulary(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each id's bytes, `vocab_size` long (the logits' width); special tokens and padding ids are
    empty, which xgrammar reads as "never part of the grammar's text"."""
    num_base = tokenizer.num_base_tokens
    assert vocab_size >= tokenizer.vocab_size, (vocab_size, tokenizer.vocab_size)
    return [tokenizer.token_bytes(i) for i in range(num_base)] + [b""] * (vocab_size - num_base)


class GrammarCache:
    """Compiles specs against one vocabulary; keeps the `max_entries` most recently used."""

    def __init__(self, load_vocab: Callable[[], tuple[list[bytes], Sequence[int]]],
                 max_entries: int = 64) -> None:  # fmt: skip
        """`load_vocab` returns (bytes of each id, end-of-sequence ids); it runs once, on the
        first compile."""
        assert max_entries >= 1, max_entries
        self._load_vocab = load_vocab
        self.max_entries = max_entries
        self._compiler: Any = None
        self._vocab_size = 0
        self._eos_ids: list[int] = []
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()

    @classmethod
    def for_model(cls, model_path: str | Path, vocab_size: int, max_entries: int = 64):
        """A cache over the tokenizer files of a checkpoint directory, for logits of width
        `vocab_size` (the model's vocabulary, which may be padded past the tokenizer's)."""

        def load() -> tuple[list[bytes], Sequence[int]]:
            from shared.tokenizer import KimiTokenizer

            tokenizer = KimiTokenizer.from_dir(model_path)
            return vocabulary(tokenizer, vocab_size), tokenizer.eos_token_ids

        return cls(load, max_entries)

    def __len__(self) -> int:
        return len(self._compiled)

    def compile(self, spec: GrammarSpec) -> Any:
        """The `xgrammar.CompiledGrammar` of `spec`; raises `GrammarError`."""
        key = (spec.kind, spec.schema)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            compiler = self._compiler_locked()
        if spec.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {spec.kind!r}")
        grammar = json_grammar(spec.kind, spec.schema)
        try:  # outside the lock: a large schema must not hold up other requests' lookups
            compiled = compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(_reason(exc)) from exc
        with self._lock:
            self._compiled[key] = compiled
            self._compiled.move_to_end(key)
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def start(self, spec: GrammarSpec, stop_ids: Sequence[int]) -> GrammarState:
        """A fresh state for one request that ends on `stop_ids` (none, as with `ignore_eos`:
        the tokenizer's end-of-sequence ids); raises `GrammarError`."""
        compiled = self.compile(spec)
        ends = list(stop_ids) or self._eos_ids
        return GrammarState(compiled, self._vocab_size, ends, spec.reasoning_end_id)

    def _compiler_locked(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            try:
                vocab, eos_ids = self._load_vocab()
            except OSError as exc:
                message = f"the tokenizer for constrained decoding is missing: {exc}"
                raise GrammarError(message) from exc
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab),
                                     stop_token_ids=list(eos_ids))  # fmt: skip
            # xgrammar's own cache is off: this class bounds the entries by count.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            self._vocab_size = len(vocab)
            self._eos_ids = list(eos_ids)
        return self._compiler


class GrammarState:
    """One request's constraint: free reasoning first (when `reasoning_end_id` is set), then the
    grammar's matcher, then only stop tokens."""

    def __init__(self, compiled: Any, vocab_size: int, stop_ids: Sequence[int],
                 reasoning_end_id: int | None = None) -> None:  # fmt: skip
        assert stop_ids, "a grammar needs a token that ends it"
        xgr = _xgr()
        self._compiled = compiled
        self.vocab_size = vocab_size
        self.stop_ids = sorted(set(stop_ids))
        self.reasoning_end_id = reasoning_end_id
        self.in_reasoning = reasoning_end_id is not None
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32

    def restart(self) -> GrammarState:
        """A fresh state over the same compiled grammar (another worker's view of the request)."""
        return GrammarState(self._compiled, self.vocab_size, self.stop_ids, self.reasoning_end_id)

    @property
    def terminated(self) -> bool:
        return not self.in_reasoning and self._matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advances past an emitted token; False when the grammar does not allow it (the state
        is unchanged then). A stop id is always taken: `mask` offers one only where the grammar
        ended or cannot go on, and it ends the request either way."""
        if self.in_reasoning:
            self.in_reasoning = token_id != self.reasoning_end_id
            return True
        if self._matcher.is_terminated():
            return token_id in self.stop_ids
        return self._matcher.accept_token(token_id) or token_id in self.stop_ids

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of float logits [V] with every token the state forbids at -inf (a copy);
        `logits` itself while reasoning."""
        if self.in_reasoning:
            return logits
        if not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(self._bitmask)
            if self._bitmask.any():
                masked = logits.clone()[None]  # [1, V]
                bitmask = self._bitmask.to(logits.device, non_blocking=True)
                _xgr().apply_token_bitmask_inplace(masked, bitmask, vocab_size=logits.shape[-1])
                return masked[0]
        # The grammar has ended, or (a schema that admits nothing here) cannot go on: only a stop
        # id, so the request ends instead of sampling from nothing and failing its whole batch.
        allowed = torch.full_like(logits, float("-inf"))
        ids = torch.tensor(self.stop_ids, dtype=torch.long, device=logits.device)
        allowed[ids] = logits[ids]
        return allowed
