"""Tokenizer: the tiny trained vocabulary, Kimi's special-token layout, encode/decode and
streaming detokenization."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import tokenizer as tokenizer_module
from shared.tokenizer import (
    PAT_STR,
    IncrementalDetokenizer,
    KimiTokenizer,
    _split_runs,
)
from shared.tokenizer_train import CORPUS_PATH, tokenizer_config, write_tokenizer_files

BASE = 1792  # the tiny vocabulary's number of base ranks (write_tokenizer_files default)
REAL_BASE = 163_584  # Kimi-K2.5's


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_tokenizer_files_is_deterministic(tiny_tokenizer_dir, tmp_path):
    ids = write_tokenizer_files(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert _sha256(tmp_path / name) == _sha256(tiny_tokenizer_dir / name), name
    assert ids == {
        "bos_token_id": BASE,
        "eos_token_id": BASE + 1,
        "im_end_token_id": BASE + 2,
        "media_placeholder_token_id": BASE + 21,
        "pad_token_id": BASE + 255,
        "vocab_size": BASE + 256,
    }


def test_vocab_file_format(tiny_tokenizer_dir):
    lines = (tiny_tokenizer_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == BASE
    tokens = []
    for rank, line in enumerate(lines):
        token_b64, rank_text = line.split(" ")
        assert int(rank_text) == rank
        tokens.append(base64.b64decode(token_b64))
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(set(tokens)) == BASE


@pytest.mark.parametrize(
    ("token", "offset"),
    [
        ("[BOS]", 0),
        ("[EOS]", 1),
        ("<|im_end|>", 2),
        ("<|im_user|>", 3),
        ("<|im_assistant|>", 4),
        ("<|start_header_id|>", 6),
        ("<|end_header_id|>", 7),
        ("[EOT]", 9),
        ("<|im_system|>", 10),
        ("<|tool_calls_section_begin|>", 11),
        ("<|tool_calls_section_end|>", 12),
        ("<|tool_call_begin|>", 13),
        ("<|tool_call_argument_begin|>", 14),
        ("<|tool_call_end|>", 15),
        ("<|im_middle|>", 17),
        ("<|media_begin|>", 18),
        ("<|media_content|>", 19),
        ("<|media_end|>", 20),
        ("<|media_pad|>", 21),
        ("<think>", 22),
        ("</think>", 23),
        ("[UNK]", 254),
        ("[PAD]", 255),
    ],
)
def test_special_tokens_sit_where_kimi_has_them(tiny_tokenizer, token, offset):
    assert tiny_tokenizer.token_id(token) == BASE + offset
    assert tiny_tokenizer.decode([BASE + offset]) == token


def test_special_block_is_complete(tiny_tokenizer, tiny_tokenizer_dir):
    specials = tiny_tokenizer.special_ids
    assert sorted(specials.values()) == list(range(BASE, BASE + 256))
    for offset in (5, 8, 16, 24, 253):
        assert specials[f"<|reserved_token_{BASE + offset}|>"] == BASE + offset
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert len(config["added_tokens_decoder"]) == 256
    assert tiny_tokenizer.vocab_size == BASE + 256
    assert tiny_tokenizer.num_base_tokens == BASE
    with pytest.raises(KeyError, match="not a special token"):
        tiny_tokenizer.token_id("<|no_such_token|>")


def test_eos_token_ids_are_im_end_and_eos(tiny_tokenizer):
    assert tiny_tokenizer.eos_token_ids == (
        tiny_tokenizer.token_id("<|im_end|>"),
        tiny_tokenizer.token_id("[EOS]"),
    )


def test_encode_turns_special_strings_into_special_ids(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hi<|im_end|><think>x</think>")
    im_end, think, end_think = (
        tiny_tokenizer.token_id(t) for t in ("<|im_end|>", "<think>", "</think>")
    )
    assert ids[-4:] == [im_end, think, *tiny_tokenizer.encode("x"), end_think]
    assert all(i < BASE for i in tiny_tokenizer.encode("Hi"))


def test_decode_skip_special_tokens_keeps_tool_markers(tiny_tokenizer):
    text = "a<|im_end|><|tool_call_begin|>b<think>"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "a<|tool_call_begin|>b"


def test_split_runs_follows_kimi_cut_points():
    assert list(_split_runs("", 3)) == [""]
    assert list(_split_runs("aaaaaaa", 3)) == ["aaa", "aaa", "a"]
    assert list(_split_runs("       ", 3)) == ["   ", "   ", " "]
    # A change between whitespace and non-whitespace restarts the count without cutting.
    assert list(_split_runs("abc  defg", 3)) == ["abc  def", "g"]
    assert list(_split_runs("ab cd", 3)) == ["ab cd"]


def _split_runs_by_walking(text: str, max_run: int) -> list[str]:
    """Kimi's own cut rule, one character at a time: the reference for `_split_runs`."""
    pieces, piece_start, run_len = [], 0, 0
    run_is_space = text[0].isspace() if text else False
    for i, char in enumerate(text):
        if char.isspace() != run_is_space:
            run_is_space, run_len = char.isspace(), 1
            continue
        run_len += 1
        if run_len > max_run:
            pieces.append(text[piece_start:i])
            piece_start, run_len = i, 1
    return pieces + [text[piece_start:]]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab \t\n\u00a0\u2003\u3000\x1c\u200b\u0085", max_size=60),
       st.integers(1, 6))  # fmt: skip
def test_split_runs_equals_the_character_walk(text, max_run):
    assert list(_split_runs(text, max_run)) == _split_runs_by_walking(text, max_run)


def test_split_runs_is_linear_on_long_runs():
    text = ("x" * 24_000 + " ") * 200 + "y" * 60_000  # runs just under and over the limit
    started = time.perf_counter()
    pieces = list(_split_runs(text, 25_000))
    assert time.perf_counter() - started < 1.0
    assert [len(p) for p in pieces[1:]] == [25_000, 10_000]  # only the last run is cut
    assert "".join(pieces) == text


def test_long_input_is_encoded_in_pieces(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_RUN_CHARS", 5)
    monkeypatch.setattr(tokenizer_module, "MAX_ENCODE_CHARS", 8)
    text = "bbbbbbb cc"
    # Pieces: chunks of 8 chars ("bbbbbbb ", "cc"), each cut where a run exceeds 5.
    expected = [i for piece in ("bbbbb", "bb ", "cc") for i in tiny_tokenizer.encode(piece)]
    assert tiny_tokenizer.encode(text) == expected
    assert tiny_tokenizer.decode(expected) == text


def test_pretokenizer_pattern_agrees_with_tiktoken(tiny_tokenizer):
    """The trainer splits with Python `regex` (V1 mode) and tiktoken with Rust regex; on the
    corpus both must cut in the same places."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    pieces = regex.compile(PAT_STR, flags=regex.V1).findall(text)
    assert "".join(pieces) == text
    assert [i for p in pieces for i in tiny_tokenizer.encode(p)] == tiny_tokenizer.encode(text)


def test_compresses_corpus_text(tiny_tokenizer):
    text = CORPUS_PATH.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) / len(tiny_tokenizer.encode(text)) > 2.0


def test_loads_a_real_size_kimi_layout(tmp_path):
    """A directory with Kimi-K2.5's sizes (163,584 ranks) loads with specials at 163584+."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([c, a, b]) for c in (0x80, 0x81) for a in range(256) for b in range(256)]
    tokens = tokens[:REAL_BASE]
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)]
    (tmp_path / "tiktoken.model").write_text("".join(lines))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(REAL_BASE)))
    tok = KimiTokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 163_840
    assert tok.token_id("<|im_end|>") == 163_586
    assert tok.token_id("<|im_system|>") == 163_594
    assert tok.token_id("<|tool_calls_section_begin|>") == 163_595
    assert tok.token_id("<|media_pad|>") == 163_605
    assert tok.token_id("<think>") == 163_606
    assert tok.token_id("[PAD]") == 163_839
    assert tok.eos_token_ids == (163_586, 163_585)
    text = "héllo 世界 <|im_end|>"
    assert tok.decode(tok.encode(text)) == text


def test_config_that_does_not_match_the_vocabulary_is_rejected(tiny_tokenizer_dir, tmp_path):
    (tmp_path / "tiktoken.model").write_bytes((tiny_tokenizer_dir / "tiktoken.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(BASE + 1)))
    with pytest.raises(ValueError, match="outside the special block"):
        KimiTokenizer.from_dir(tmp_path)


_POOLS = [
    [chr(c) for c in range(0x20, 0x7F)],
    [chr(c) for c in range(0xA0, 0x180)],
    [chr(c) for c in range(0x4E00, 0x4E00 + 400)],
    [chr(c) for c in range(0x3040, 0x30FF)],
    [chr(c) for c in range(0x1F300, 0x1F3FF)] + [chr(c) for c in range(0x1F600, 0x1F64F)],
    ["\u200d", "\ufe0f", "\U0001f3fd", "\U0001f1eb\U0001f1f7", "👨‍👩‍👧"],
    [chr(c) for c in range(0x300, 0x36F)],
    [chr(c) for c in range(0x400, 0x4FF)] + [chr(c) for c in range(0x600, 0x6FF)],
    [" ", "\n", "\t", "\r\n", "  ", "\u3000", "\xa0"],
    ["'s", "'LL", "123456", "3.14", "<|", "|>", "<think", '{"a": 1}'],
]


def _random_unicode(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(1, 40)):
        if rng.random() < 0.05:
            code = rng.randrange(0x20, 0x110000)
            if not 0xD800 <= code <= 0xDFFF:
                parts.append(chr(code))
        else:
            parts.append(rng.choice(rng.choice(_POOLS)))
    return "".join(parts)


def _stream_decode(tok: KimiTokenizer, ids: list[int], rng: random.Random) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    pieces, i = [], 0
    while i < len(ids):
        step = rng.randrange(1, 4)
        pieces.append(detok.feed(ids[i : i + step]))
        i += step
    pieces.append(detok.flush())
    return pieces


def test_roundtrip_1000_random_unicode_strings(tiny_tokenizer):
    rng = random.Random(1234)
    for _ in range(1000):
        text = _random_unicode(rng)
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
        pieces = _stream_decode(tiny_tokenizer, ids, rng)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_detokenizer_holds_back_partial_characters(tiny_tokenizer):
    text = "a🦜b"  # not in the corpus: the parrot is spelled with several byte tokens
    ids = tiny_tokenizer.encode(text)
    assert len(ids) > 3
    detok = IncrementalDetokenizer(tiny_tokenizer)
    outputs = [detok.feed([i]) for i in ids] + [detok.flush()]
    assert outputs[0] == "a"
    assert "🦜" in outputs and outputs[-1] == ""
    assert "".join(outputs) == text


def test_incremental_detokenizer_skips_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x<|im_end|><|tool_call_end|>y")
    detok = IncrementalDetokenizer(tiny_tokenizer, skip_special_tokens=True)
    text = "".join(detok.feed([i]) for i in ids) + detok.flush()
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True) == "x<|tool_call_end|>y"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_incremental_detokenizer_matches_decode_on_any_ids(tiny_tokenizer, data):
    """Arbitrary ids, including invalid UTF-8 byte sequences: same text as `decode`."""
    ids = data.draw(st.lists(st.integers(0, tiny_tokenizer.vocab_size - 1), max_size=30))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    detok = IncrementalDetokenizer(tiny_tokenizer)
    text = ""
    for start, end in zip([0, *cuts], [*cuts, len(ids)]):
        text += detok.feed(ids[start:end])
    assert text + detok.flush() == tiny_tokenizer.decode(ids)
