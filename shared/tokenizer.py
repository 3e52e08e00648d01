"""Kimi-K2.5 tokenizer: tiktoken BPE over Kimi's vocabulary files, plus streaming decode.

A tokenizer directory holds `tiktoken.model` (one `base64(token_bytes) rank` line per base
token) and `tokenizer_config.json` (the 256 reserved special tokens, by id, in
`added_tokens_decoder`). The same loader reads the real Kimi-K2.5 directory (163,584 base
ranks, specials 163584..163839) and the tiny generated one (`shared.tokenizer_train`).

Token ids of special tokens always come from these files: look them up with
`KimiTokenizer.token_id("<|im_end|>")`, never hard-code them.
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

logger = logging.getLogger(__name__)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Kimi's pre-tokenizer (spec section 8.1). `&&` is character-class intersection: tiktoken's
# regex engine supports it; Python's `regex` module needs the V1 flag.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Long inputs are cut into pieces before tiktoken sees them, exactly as Kimi's
# `tokenization_kimi.py` does: the cut points are token boundaries, so they change the ids.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
STOP_TOKENS = ("<|im_end|>", "[EOS]")


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken-format vocabulary: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64)
            assert token not in ranks, f"{path}:{line_no}: duplicate token {token!r}"
            ranks[token] = int(rank)
    return ranks


def split_long_input(text: str) -> Iterator[str]:
    """Yield pieces of at most MAX_ENCODE_CHARS with no whitespace or non-whitespace run
    longer than MAX_RUN_CHARS (tiktoken's recursion guard), in Kimi's cut positions."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        yield from _split_runs(text[start : start + MAX_ENCODE_CHARS], MAX_RUN_CHARS)


def _split_runs(text: str, max_run: int) -> Iterator[str]:
    """Cuts every maximal run of whitespace or of non-whitespace longer than `max_run` after each
    `max_run` characters. A run can only match from its first character (the look-behinds), so
    the scan is linear; `\\s` and `str.isspace` share CPython's definition of whitespace."""
    piece_start = 0
    for run in _long_runs(max_run).finditer(text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield text[piece_start:cut]
            piece_start = cut
    yield text[piece_start:]


@functools.cache
def _long_runs(max_run: int) -> re.Pattern:
    return re.compile(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}")


class KimiTokenizer:
    """Byte-level BPE tokenizer with Kimi's 256 reserved special tokens.

    `encode` recognises every special-token string in the text as its special id
    (`allowed_special="all"`, as Kimi does), so callers that render untrusted text into a
    prompt get special ids for marker strings typed by users. `decode` keeps specials unless
    asked to skip those flagged `special` in `tokenizer_config.json`.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        skippable_ids: frozenset[int],
        name: str = "kimi",
    ) -> None:
        self.num_base_tokens = len(ranks)
        self._special_ids = dict(special_tokens)
        self._skippable_ids = skippable_ids
        self._encoding = tiktoken.Encoding(
            name=name,
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special_tokens,
        )
        self.vocab_size = self.num_base_tokens + len(special_tokens)
        self.eos_token_ids = tuple(self.token_id(t) for t in STOP_TOKENS)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> KimiTokenizer:
        """Load `tiktoken.model` and `tokenizer_config.json` from a model directory."""
        model_dir = Path(model_dir)
        ranks = load_ranks(model_dir / VOCAB_FILE)
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        specials, skippable = _special_tokens(config, len(ranks))
        logger.info(
            "loaded tokenizer from %s: %d base tokens, %d specials",
            model_dir,
            len(ranks),
            len(specials),
        )
        return cls(ranks, specials, skippable, name=model_dir.name or "kimi")

    @property
    def special_ids(self) -> dict[str, int]:
        """All special tokens, by token string (a copy)."""
        return dict(self._special_ids)

    def token_id(self, token: str) -> int:
        """The id of a special token, e.g. `token_id("<|im_end|>")`."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings become special ids."""
        ids: list[int] = []
        for piece in split_long_input(text):
            ids.extend(self._encoding.encode(piece, allowed_special="all"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, as in Kimi's decoder."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skippable_ids]
        return self._encoding.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's bytes are its string)."""
        return self._encoding.decode_single_token_bytes(token_id)

    def is_skippable(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return token_id in self._skippable_ids


def _special_tokens(config: dict, num_base_tokens: int) -> tuple[dict[str, int], frozenset[int]]:
    """Map the reserved id block to token strings, as Kimi's tokenizer does: ids named in
    `added_tokens_decoder` keep their names, the others are `<|reserved_token_{id}|>`."""
    declared = config.get("added_tokens_decoder", {})
    block = range(num_base_tokens, num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)
    outside = sorted(int(i) for i in declared if int(i) not in block)
    if outside:
        raise ValueError(
            f"tokenizer_config.json declares special id {outside[0]} outside the special block "
            f"{block.start}..{block.stop - 1} that follows the {num_base_tokens} base tokens"
        )
    specials: dict[str, int] = {}
    skippable: set[int] = set()
    for token_id in block:
        entry = declared.get(str(token_id))
        name = entry["content"] if entry else f"<|reserved_token_{token_id}|>"
        assert name not in specials, f"special token {name!r} declared twice"
        specials[name] = token_id
        if entry is None or entry.get("special", True):
            skippable.add(token_id)
    return specials, frozenset(skippable)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text.

    A multi-byte UTF-8 character split across tokens is held back until its last byte
    arrives, so no output ever contains half a character. Invalid bytes become U+FFFD exactly
    as in `KimiTokenizer.decode`, so the concatenation of every `feed` plus `flush` equals
    `decode(all_ids)`. One instance serves one sequence; `flush` ends it.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.num_tokens = 0

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add token ids; return the newly completed text (may be empty)."""
        self.num_tokens += len(token_ids)
        tok = self._tokenizer
        data = b"".join(
            tok.token_bytes(i)
            for i in token_ids
            if not (self._skip_special_tokens and tok.is_skippable(i))
        )
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End the sequence: held-back incomplete bytes come out as U+FFFD."""
        return self._decoder.decode(b"", final=True)
