"""kimi_k2 reasoning and tool-call parsers: the parser cases of cases.md (K01-K22), and
streaming == non-streaming for every way of splitting the output."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.chat_template import resolve_thinking
from shared.parsers import (
    ChatOutputParser,
    KimiK2ReasoningParser,
    KimiK2ToolParser,
    MarkerTable,
    ToolCall,
    count_history_tool_calls,
    tool_name_from_id,
    unwrap_arguments,
)
from shared.tokenizer import IncrementalDetokenizer

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
TEXT_MARKERS = MarkerTable.text_only()


def call(name_id: str, args: str) -> str:
    return f"{CB}{name_id}{AB}{args}{CE}"


@pytest.fixture(scope="module")
def markers(tiny_tokenizer):
    return MarkerTable.from_tokenizer(tiny_tokenizer)


@dataclasses.dataclass
class Streamed:
    """What a client sees from the deltas, plus the stream's final result."""

    reasoning: str
    content: str
    calls: dict[int, dict]
    result: object
    deltas: list


def _aggregate(deltas, result) -> Streamed:
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.index not in calls:
                assert piece.id and piece.name and piece.arguments == "", piece
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            else:
                assert piece.id is None and piece.name is None, piece
                calls[piece.index]["arguments"] += piece.arguments
    return Streamed(
        reasoning="".join(d.reasoning_text for d in deltas),
        content="".join(d.content_text for d in deltas),
        calls=calls,
        result=result,
        deltas=deltas,
    )


def stream_ids(parser: ChatOutputParser, tok, ids: list[int], cuts=()) -> Streamed:
    """Feed `ids` split at `cuts`, with text from an IncrementalDetokenizer."""
    stream, detok = parser.stream(), IncrementalDetokenizer(tok)
    bounds = [0, *sorted(cuts), len(ids)]
    deltas = [stream.feed(ids[a:b], detok.feed(ids[a:b])) for a, b in zip(bounds, bounds[1:])]
    deltas += [stream.feed([], detok.flush()), stream.finish()]
    return _aggregate(deltas, stream.result())


def stream_chunks(parser: ChatOutputParser, tok, chunks: list[str]) -> Streamed:
    """Feed text chunks (with their ids in id mode)."""
    stream = parser.stream()
    use_ids = parser.markers.uses_ids
    deltas = [stream.feed(tok.encode(c) if use_ids else None, c) for c in chunks]
    deltas.append(stream.finish())
    return _aggregate(deltas, stream.result())


def check_invariance(parser: ChatOutputParser, tok, raw: str, seed: int = 0):
    """Parse `raw` whole and streamed many ways (ids, and text-only); all must agree.
    Returns the non-streaming result."""
    ids = tok.encode(raw)
    text_parser = _text_twin(parser)
    expected = parser.parse(ids, tok.decode(ids))
    assert text_parser.parse(None, raw) == expected
    rng = random.Random(seed)
    runs = [stream_ids(parser, tok, ids, range(1, len(ids))), stream_ids(parser, tok, ids)]
    for _ in range(8):
        runs.append(stream_ids(parser, tok, ids, rng.sample(range(len(ids) + 1), 3)))
        cuts = sorted(rng.sample(range(len(raw) + 1), 4))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        runs.append(stream_chunks(text_parser, tok, chunks))
    runs.append(stream_chunks(text_parser, tok, list(raw)))
    for run in runs:
        assert run.result == expected
        _assert_deltas_match(run, expected)
    return expected


def _text_twin(parser: ChatOutputParser) -> ChatOutputParser:
    return ChatOutputParser(
        TEXT_MARKERS,
        thinking=parser.thinking,
        parse_tools=parser.parse_tools,
        history_tool_calls=parser.history_tool_calls,
    )


def _assert_deltas_match(run: Streamed, expected) -> None:
    assert run.reasoning == (expected.reasoning or "")
    assert run.content == expected.content
    for tc in expected.tool_calls:
        assert run.calls[tc.index] == {"id": tc.id, "name": tc.name, "arguments": tc.arguments}


def _parser(markers, **kw) -> ChatOutputParser:
    return ChatOutputParser(markers, **kw)


# --- group A: tool calls -------------------------------------------------------------------


def test_k01_back_to_back_tool_calls(markers, tiny_tokenizer):
    raw = (
        f"Checking both. {SB}"
        + call("functions.get_weather:0", '{"lat": 48.85, "lon": 2.35}')
        + call("functions.get_news:1", '{"topic": "Paris transit"}')
        + SE
    )
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.content == "Checking both. "
    assert result.tool_calls == [
        ToolCall(0, "functions.get_weather:0", "get_weather", '{"lat": 48.85, "lon": 2.35}'),
        ToolCall(1, "functions.get_news:1", "get_news", '{"topic": "Paris transit"}'),
    ]
    assert all("<|" not in tc.id for tc in result.tool_calls)


def test_k02_hyphenated_names(markers, tiny_tokenizer):
    raw = SB + call("functions.mcp__files__read-dir:0", '{"path": "/srv/data"}') + SE
    parser = _parser(markers, thinking=False)
    result = check_invariance(parser, tiny_tokenizer, raw)
    expected = [ToolCall(0, "functions.mcp__files__read-dir:0", "mcp__files__read-dir", '{"path": "/srv/data"}')]  # fmt: skip
    assert result.tool_calls == expected and result.content == ""
    split = raw.index('th": "/srv')
    for p in (parser, _text_twin(parser)):
        run = stream_chunks(p, tiny_tokenizer, [raw[:split], raw[split:]])
        assert run.result.tool_calls == expected and run.content == ""


def test_k03_dotted_names_and_trimmed_arguments(markers, tiny_tokenizer):
    raw = SB + f'{CB}functions.billing.invoices.list:0 {AB} {{"month": "2025-01"}} {CE}' + SE
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.tool_calls == [
        ToolCall(0, "functions.billing.invoices.list:0", "billing.invoices.list",
                 '{"month": "2025-01"}'),
    ]  # fmt: skip
    run = stream_ids(_parser(markers, thinking=False), tiny_tokenizer, tiny_tokenizer.encode(raw))
    assert run.calls[0]["arguments"] == '{"month": "2025-01"}'


def test_k04_section_end_missing(markers, tiny_tokenizer):
    raw = (
        SB
        + call("functions.get_weather:0", '{"city": "Lyon"}')
        + f'{CB}functions.get_time:1{AB}{{"tz": "Eur'
    )
    parser = _parser(markers, thinking=False)
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert result.content == ""
    assert result.tool_calls == [
        ToolCall(0, "functions.get_weather:0", "get_weather", '{"city": "Lyon"}')
    ]
    # Streaming shows the truncated call as it arrived; the final result leaves it out.
    run = stream_ids(parser, tiny_tokenizer, tiny_tokenizer.encode(raw), range(1, 200))
    assert run.calls[1] == {"id": "functions.get_time:1", "name": "get_time",
                            "arguments": '{"tz": "Eur'}  # fmt: skip
    assert len(run.result.tool_calls) == 1


def test_k04_complete_calls_without_section_end(markers, tiny_tokenizer):
    raw = SB + call("functions.a:0", "{}") + call("functions.b:1", '{"x": 1}')
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("a", "{}"), ("b", '{"x": 1}')]


def test_k06_double_encoded_arguments(markers, tiny_tokenizer):
    inner = '{"items": [{"id": "t1", "status": "pending"}]}'
    raw = SB + call("functions.TodoWrite:3", json.dumps(inner)) + SE
    parser = _parser(markers, thinking=False, history_tool_calls=3)
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert result.tool_calls == [ToolCall(0, "functions.TodoWrite:3", "TodoWrite", inner)]
    assert result.content == ""


def test_k06_quoted_string_that_is_not_an_object_stays_raw():
    assert unwrap_arguments('"just text"') == '"just text"'
    assert unwrap_arguments('"[1, 2]"') == '"[1, 2]"'
    assert unwrap_arguments('"{broken"') == '"{broken"'


def test_k08_ids_and_stream_indices(markers, tiny_tokenizer):
    raw = (
        SB
        + call("functions.get_weather:5", '{"city": "Graz"}')
        + call("functions.get_weather:6", '{"city": "Linz"}')
        + SE
    )
    history = [{"role": "assistant", "tool_calls": [{"id": f"c{i}"} for i in range(5)]}]
    parser = _parser(markers, thinking=False, history_tool_calls=count_history_tool_calls(history))
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert [(c.index, c.id) for c in result.tool_calls] == [
        (0, "functions.get_weather:5"),
        (1, "functions.get_weather:6"),
    ]
    run = stream_ids(parser, tiny_tokenizer, tiny_tokenizer.encode(raw), range(1, 200))
    pieces = [p for d in run.deltas for p in d.tool_calls]
    first = [p for p in pieces if p.index == 0]
    assert first[0].id == "functions.get_weather:5" and first[0].name == "get_weather"
    assert all(p.index in (0, 1) for p in pieces)
    assert [p for p in pieces if p.index == 1][0].id == "functions.get_weather:6"


K10_RAW = (
    "Sure, one sec."
    + SB
    + call("functions.get_weather:0", '{"city": "Kyiv"}')
    + call("functions.get_weather:1", '{"city": "Riga"}')
    + SE
)


def _check_k10(run) -> None:
    assert run.result.content == "Sure, one sec."
    assert [json.loads(c.arguments) for c in run.result.tool_calls] == [
        {"city": "Kyiv"},
        {"city": "Riga"},
    ]
    for delta in run.deltas:
        assert "<|" not in delta.content_text and "functions." not in delta.content_text


@pytest.mark.parametrize("use_ids", [True, False])
def test_k10_chunk_boundary_invariance(markers, tiny_tokenizer, use_ids):
    parser = _parser(markers if use_ids else TEXT_MARKERS, thinking=False)
    ids = tiny_tokenizer.encode(K10_RAW)
    a = K10_RAW.index('iv"}')
    b = K10_RAW.index('ty": "Riga')
    runs = [
        stream_chunks(parser, tiny_tokenizer, [K10_RAW]),  # (b) all at once
        stream_chunks(parser, tiny_tokenizer, [K10_RAW[:a], K10_RAW[a:b], K10_RAW[b:]]),  # (c)
    ]
    if use_ids:  # (a) one token per delta, and groups of 2, 3, 5, 8 tokens
        runs += [stream_ids(parser, tiny_tokenizer, ids, range(0, len(ids), n)) for n in (1, 2, 3, 5, 8)]  # fmt: skip
    else:  # (a) one character per delta
        runs += [stream_chunks(parser, tiny_tokenizer, list(K10_RAW))]
    for run in runs:
        _check_k10(run)
        assert run.result == parser.parse(ids if use_ids else None, K10_RAW)


def test_k10_whitespace_and_newline_around_ids(markers, tiny_tokenizer):
    raw = K10_RAW.replace(
        call("functions.get_weather:0", '{"city": "Kyiv"}'),
        f'{CB}\nfunctions.get_weather:0 {AB} {{"city": "Kyiv"}} {CE}',
    )
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.content == "Sure, one sec."
    assert [c.arguments for c in result.tool_calls] == ['{"city": "Kyiv"}', '{"city": "Riga"}']
    assert result.tool_calls[0].id == "functions.get_weather:0"


def test_k11_stray_text_inside_section_and_text_after_it(markers, tiny_tokenizer):
    raw = f"Plan: {SB} stray words " + call("functions.ping:0", "{}") + SE + " Done."
    result = check_invariance(_parser(markers, thinking=True), tiny_tokenizer, "ok</think>" + raw)
    assert result.tool_calls == [ToolCall(0, "functions.ping:0", "ping", "{}")]
    assert result.content == "Plan:  Done."
    assert "stray" not in result.reasoning


def test_k11_empty_arguments_become_an_empty_object(markers, tiny_tokenizer):
    raw = SB + call("functions.ping:0", "  ") + SE
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.tool_calls == [ToolCall(0, "functions.ping:0", "ping", "{}")]


def test_k14_malformed_json_is_passed_through(markers, tiny_tokenizer):
    raw = (
        SB
        + call("functions.set_flag:0", '{"name": "beta", "on": tru')
        + call("functions.list_flags:1", "{}")
        + SE
    )
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.tool_calls == [
        ToolCall(0, "functions.set_flag:0", "set_flag", '{"name": "beta", "on": tru'),
        ToolCall(1, "functions.list_flags:1", "list_flags", "{}"),
    ]


def test_name_idx_ids_without_prefix_are_accepted(markers, tiny_tokenizer):
    raw = SB + call("search:0", '{"q": "x"}') + call(":1", "{}") + SE
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    # The nameless second call is dropped.
    assert result.tool_calls == [ToolCall(0, "functions.search:0", "search", '{"q": "x"}')]


def test_calls_end_implicitly_and_headers_without_arguments_are_dropped(markers, tiny_tokenizer):
    raw = (
        f"{CB}functions.a:0{AB}{{}}"  # no section begin, no call end: closed by the next call
        + f"{CB}functions.lost:1{CE}"  # no argument marker: dropped
        + call("functions.b:1", '{"k": 2}')
        + "dropped"
        + SE
        + "kept"
    )
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert [(c.index, c.id, c.arguments) for c in result.tool_calls] == [
        (0, "functions.a:0", "{}"),
        (1, "functions.b:1", '{"k": 2}'),
    ]
    assert result.content == "kept"


def test_tool_name_from_id():
    assert tool_name_from_id("functions.billing.invoices.list:0") == "billing.invoices.list"
    assert tool_name_from_id(" functions.mcp__a__b-c:12\n") == "mcp__a__b-c"
    assert tool_name_from_id("search:3") == "search"
    assert tool_name_from_id("functions.get") == "get"


def test_without_tool_parsing_markup_stays_in_content(markers, tiny_tokenizer):
    raw = "x" + SB + call("functions.a:0", "{}") + SE
    parser = _parser(markers, thinking=False, parse_tools=False)
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert result.content == raw and result.tool_calls == []


def test_stop_tokens_are_not_content(markers, tiny_tokenizer):
    raw = "Hello<|im_end|>"
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert result.content == "Hello"


# --- group B: reasoning ----------------------------------------------------------------------


def test_k16_tool_call_inside_think_without_close_tag(markers, tiny_tokenizer):
    raw = (
        "Need the file first." + SB + call("functions.read_file:0", '{"path": "/app/main.py"}') + SE
    )
    parser = _parser(markers, thinking=True)
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert result.reasoning == "Need the file first."
    assert result.content == ""
    assert result.tool_calls == [
        ToolCall(0, "functions.read_file:0", "read_file", '{"path": "/app/main.py"}')
    ]
    for run in (
        stream_ids(parser, tiny_tokenizer, tiny_tokenizer.encode(raw), range(1, 100)),
        stream_chunks(_text_twin(parser), tiny_tokenizer, list(raw)),
    ):
        assert all("<|" not in d.reasoning_text for d in run.deltas)


def test_k16_partial_marker_is_held_back(tiny_tokenizer):
    stream = ChatOutputParser(TEXT_MARKERS, thinking=True).stream()
    delta = stream.feed(None, "Need the file first.<|tool")
    assert delta.reasoning_text == "Need the file first."
    delta = stream.feed(None, "_calls_section_begin|>")
    assert delta.reasoning_text == "" and delta.content_text == ""


@pytest.mark.parametrize(
    ("raw", "reasoning", "content"),
    [
        ("Rain haiku requested.</think>Soft rain on tin roofs", "Rain haiku requested.",
         "Soft rain on tin roofs"),
        ("<think>Rain haiku requested.</think>Soft rain on tin roofs", "Rain haiku requested.",
         "Soft rain on tin roofs"),
        ("<think></think>Soft rain", "", "Soft rain"),
        ("just thinking, no tags", "just thinking, no tags", ""),
    ],
)  # fmt: skip
def test_k17_missing_opening_think_and_no_tags(markers, tiny_tokenizer, raw, reasoning, content):
    result = check_invariance(_parser(markers, thinking=True), tiny_tokenizer, raw)
    assert (result.reasoning, result.content) == (reasoning, content)


def test_k18_instant_mode_answer_is_content(markers, tiny_tokenizer):
    thinking = resolve_thinking({"thinking": False})
    raw = "Hello! What can I do for you?"
    parser = _parser(markers, thinking=thinking)
    result = check_invariance(parser, tiny_tokenizer, raw)
    assert result.reasoning is None and result.content == raw
    run = stream_ids(parser, tiny_tokenizer, tiny_tokenizer.encode(raw), range(1, 40))
    assert all(d.reasoning_text == "" for d in run.deltas)


def test_k18_instant_mode_think_block_if_the_model_opens_one(markers, tiny_tokenizer):
    raw = "<think>hmm</think>Hi"
    result = check_invariance(_parser(markers, thinking=False), tiny_tokenizer, raw)
    assert (result.reasoning, result.content) == ("hmm", "Hi")


@pytest.mark.parametrize(
    ("kwargs", "reasoning", "content"),
    [
        ({"enable_thinking": False}, None, "plan</think>answer"),
        ({"thinking": "false"}, None, "plan</think>answer"),
        (None, "plan", "answer"),
    ],
)
def test_k19_parser_uses_the_same_switch_as_the_template(
    markers, tiny_tokenizer, kwargs, reasoning, content
):
    """The parser is configured from `resolve_thinking`, like the template. In instant mode a
    stray `</think>` is dropped, never turned into a reasoning split."""
    parser = _parser(markers, thinking=resolve_thinking(kwargs))
    result = check_invariance(parser, tiny_tokenizer, "plan</think>answer")
    assert result.reasoning == reasoning
    assert result.content == content.replace("</think>", "")


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_k21_generation_ends_inside_reasoning(markers, tiny_tokenizer, finish):
    raw = "Count letters: s, t, r, a, w"
    result = check_invariance(_parser(markers, thinking=True), tiny_tokenizer, raw)
    assert result.reasoning == raw and result.content == "" and result.tool_calls == []


def test_k22_end_marker_split_across_text_deltas(tiny_tokenizer):
    parser = ChatOutputParser(TEXT_MARKERS, thinking=True)
    run = stream_chunks(parser, tiny_tokenizer, ["Step one", "</thi", "nk>", "Answer"])
    assert (run.result.reasoning, run.result.content) == ("Step one", "Answer")
    assert all("</thi" not in d.reasoning_text for d in run.deltas)


def test_k22_end_token_id_arrives_before_its_text(markers, tiny_tokenizer):
    tok = tiny_tokenizer
    stream = _parser(markers, thinking=True).stream()
    assert stream.feed(tok.encode("Step one"), "Step one").reasoning_text == "Step one"
    held = stream.feed(tok.encode("extra") + [tok.token_id("</think>")], "extra")
    assert (held.reasoning_text, held.content_text, held.tool_calls) == ("", "", [])
    delta = stream.feed(tok.encode("Answer"), "</think>Answer")
    assert (delta.reasoning_text, delta.content_text) == ("extra", "Answer")
    stream.finish()
    assert (stream.result().reasoning, stream.result().content) == ("Step oneextra", "Answer")


@pytest.mark.parametrize("use_ids", [True, False])
def test_k22_trailing_lone_angle_bracket_is_flushed(markers, tiny_tokenizer, use_ids):
    parser = _parser(markers if use_ids else TEXT_MARKERS, thinking=False)
    run = stream_chunks(parser, tiny_tokenizer, ["if a ", "<"])
    assert run.content == run.result.content == "if a <"


def test_reasoning_parser_alone(markers, tiny_tokenizer):
    parser = KimiK2ReasoningParser(markers, thinking=True)
    raw = "think" + "</think>" + "x" + SB + call("functions.a:0", "{}")
    ids = tiny_tokenizer.encode(raw)
    result = parser.parse(ids, raw)
    assert (result.reasoning, result.content) == ("think", "x" + raw[raw.index(SB) :])


def test_tool_parser_alone(markers, tiny_tokenizer):
    parser = KimiK2ToolParser(markers, history_tool_calls=2)
    raw = "x" + SB + call("functions.a:0", "{}") + SE + "y"
    result = parser.parse(tiny_tokenizer.encode(raw), raw)
    assert result.content == "xy"
    assert result.tool_calls == [ToolCall(0, "functions.a:2", "a", "{}")]


def test_count_history_tool_calls():
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a"}, {"id": "b"}]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "done", "tool_calls": None},
    ]
    assert count_history_tool_calls(messages) == 2


# --- property tests ---------------------------------------------------------------------------

_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="|\x00"), max_size=30
)
_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,12}", fullmatch=True).filter(
    lambda n: not n.startswith("functions.")
)
_ARG_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="<|"), max_size=10
)  # marker spellings inside arguments would be encoded as marker tokens
_ARGS = st.dictionaries(
    _ARG_TEXT, st.one_of(st.integers(), _ARG_TEXT, st.lists(st.booleans()))
).map(lambda d: json.dumps(d, ensure_ascii=False))


@st.composite
def outputs(draw):
    """A raw output with reasoning, content and several tool calls, and what parsing it must
    give."""
    thinking = draw(st.booleans())
    reasoning, content, tail = draw(_TEXT), draw(_TEXT), draw(_TEXT)
    for text in (reasoning, content, tail):
        assume("<think>" not in text and "</think>" not in text)
    calls = draw(st.lists(st.tuples(_NAMES, _ARGS), max_size=3))
    end_think = draw(st.booleans()) if thinking else False
    section_end = draw(st.booleans())
    history = draw(st.integers(0, 5))
    raw = (reasoning + ("</think>" if end_think else "")) if thinking else ""
    raw += content
    if calls:
        raw += SB + "".join(call(f"functions.{n}:{history + i}", a) for i, (n, a) in enumerate(calls))  # fmt: skip
        raw += SE + tail if section_end else ""
    if thinking and not end_think and not calls:
        want = (reasoning + content, "")
    elif thinking and not end_think:
        want = (reasoning + content, tail if section_end else "")
    else:
        want = (reasoning if thinking else None, content + (tail if calls and section_end else ""))
    want_calls = [
        ToolCall(i, f"functions.{n}:{history + i}", n, a) for i, (n, a) in enumerate(calls)
    ]
    return raw, thinking, history, want, want_calls


@settings(max_examples=150, deadline=None)
@given(case=outputs(), data=st.data())
def test_streaming_equals_non_streaming_for_any_split(markers, tiny_tokenizer, case, data):
    raw, thinking, history, want, want_calls = case
    parser = _parser(markers, thinking=thinking, history_tool_calls=history)
    ids = tiny_tokenizer.encode(raw)
    expected = parser.parse(ids, tiny_tokenizer.decode(ids))
    assert (expected.reasoning, expected.content) == want
    assert expected.tool_calls == want_calls
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=12))
    run = stream_ids(parser, tiny_tokenizer, ids, cuts)
    assert run.result == expected
    _assert_deltas_match(run, expected)
    text_cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    chunks = [raw[a:b] for a, b in zip([0, *text_cuts], [*text_cuts, len(raw)])]
    text_run = stream_chunks(_text_twin(parser), tiny_tokenizer, chunks)
    assert text_run.result == expected
    _assert_deltas_match(text_run, expected)


_SOUP = st.lists(
    st.one_of(
        st.sampled_from(["<think>", "</think>", SB, SE, CB, AB, CE, "<|im_end|>", " ", "\n"]),
        st.sampled_from(["functions.f:0", "g-h.i:3", '{"a": 1}', '"{\\"b\\": 2}"', "<", "<|"]),
        _TEXT,
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(pieces=_SOUP, thinking=st.booleans(), data=st.data())
def test_malformed_marker_soup_is_split_invariant(markers, tiny_tokenizer, pieces, thinking, data):
    """Any mix of markers and text, however malformed, parses the same for every split."""
    raw = "".join(pieces)
    parser = _parser(markers, thinking=thinking)
    ids = tiny_tokenizer.encode(raw)
    expected = parser.parse(ids, tiny_tokenizer.decode(ids))
    assert _text_twin(parser).parse(None, raw) == expected
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=10))
    run = stream_ids(parser, tiny_tokenizer, ids, cuts)
    assert run.result == expected
    _assert_deltas_match(run, expected)
    text_cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    chunks = [raw[a:b] for a, b in zip([0, *text_cuts], [*text_cuts, len(raw)])]
    text_run = stream_chunks(_text_twin(parser), tiny_tokenizer, chunks)
    assert text_run.result == expected
    _assert_deltas_match(text_run, expected)
