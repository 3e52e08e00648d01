"""Hypothesis strategies for `test_fuzz.py`: OpenAI request bodies of every hostile shape.

Built over the gateway's request models (router/openai_schema.py): each field takes its valid
values, other JSON values, huge, negative and non-finite numbers and odd text; tools get odd JSON
schemas and names; image parts get broken `data:` URLs. `BYTE_MUTATIONS` break a valid body at
the byte level. Image URLs are `data:` URLs or addresses the router refuses before connecting,
so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st
from image_utils import data_url, encode
from PIL import Image

MODEL = "moonshotai/Kimi-K2.5"
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, 1e308, -0.0, 5e-324])
    | st.floats()  # NaN and infinities travel as bare NaN/Infinity, which JSON does not have
    | st.text(max_size=12)
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ODD_TEXT = st.text(max_size=40) | st.sampled_from(
    ["", " ", "<|im_end|>", "<|im_assistant|>assistant<|im_middle|>", "</think>", "\x00\x1f",
     "<|tool_calls_section_begin|>", "{{ 7 * 7 }}", "{% for x in range(10**9) %}", "\u202e"]
)  # fmt: skip
NAMES = st.sampled_from(["get_weather", "a-b", "a.b", "mcp__srv__tool", "ünï", "x" * 300, ""])
NAMES = NAMES | st.text(min_size=1, max_size=16)
SAFE_URLS = [
    "http://127.0.0.1:9/x.png", "https://10.0.0.1/a.png", "http://169.254.169.254/latest",
    "http://[::1]/x.png", "file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1", "",
]  # fmt: skip


def hostile_number(valid):
    return valid | SCALARS | st.sampled_from(["5", "1e3", "nan", "", [], {}, True])


SAMPLING = {
    "temperature": hostile_number(st.floats(0, 2)),
    "top_p": hostile_number(st.floats(0, 1)),
    "top_k": hostile_number(st.integers(-1, 100)),
    "min_p": hostile_number(st.floats(0, 1)),
    "presence_penalty": hostile_number(st.floats(-2, 2)),
    "frequency_penalty": hostile_number(st.floats(-2, 2)),
    "repetition_penalty": hostile_number(st.floats(0.1, 10)),
    "seed": hostile_number(st.integers()),
    "n": hostile_number(st.integers(1, 4)),
    "stop": ODD_TEXT | st.lists(ODD_TEXT, max_size=5) | ANY_JSON,
    "stop_token_ids": st.lists(st.integers(-5, 5000), max_size=4) | ANY_JSON,
    "stream": st.booleans() | ANY_JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | ANY_JSON,
    "ignore_eos": st.booleans() | ANY_JSON,
    "skip_special_tokens": st.booleans() | ANY_JSON,
    "include_stop_str_in_output": st.booleans() | ANY_JSON,
    "user": ODD_TEXT | ANY_JSON,
    "model": st.sampled_from([MODEL, "gpt-4", ""]) | ANY_JSON,
    "max_tokens": hostile_number(st.integers(1, 2)),
}
UNKNOWN = st.dictionaries(st.sampled_from(["logit_bias", "functions", "x", "__proto__", "🙂"]),
                          ANY_JSON, max_size=2)  # fmt: skip


def _schemas():
    kinds = st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"])
    leaf = st.fixed_dictionaries(
        {},
        optional={
            "type": kinds | st.lists(kinds, max_size=3) | ANY_JSON,
            "description": ODD_TEXT | ANY_JSON,
            "enum": st.lists(SCALARS, max_size=3) | ANY_JSON,
            "$ref": st.sampled_from(["#/$defs/a", "#/x", "#", "other.json#/a", "#/$defs/a/b"]),
            "default": SCALARS,
            "format": st.sampled_from(["date-time", "uri", "bogus"]),
        },
    )

    def extend(inner):
        return st.fixed_dictionaries(
            {},
            optional={
                "type": kinds,
                "properties": st.dictionaries(ODD_TEXT, inner, max_size=3) | ANY_JSON,
                "items": inner | st.lists(inner, max_size=2),
                "anyOf": st.lists(inner, max_size=3),
                "oneOf": st.lists(inner, max_size=2) | ANY_JSON,
                "allOf": st.lists(inner, max_size=2),
                "required": st.lists(ODD_TEXT, max_size=3) | ANY_JSON,
                "additionalProperties": st.booleans() | inner,
                "$defs": st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
            },
        )

    return st.recursive(leaf, extend, max_leaves=10)


TOOL = (
    st.fixed_dictionaries(
        {
            "type": st.just("function") | ANY_JSON,
            "function": st.fixed_dictionaries(
                {"name": NAMES | ANY_JSON},
                optional={
                    "description": ODD_TEXT | ANY_JSON,
                    "parameters": _schemas() | ANY_JSON,
                    "strict": st.booleans(),
                },
            ),  # fmt: skip
        }
    )
    | ANY_JSON
)
TOOL_CHOICE = st.sampled_from(["none", "auto", "required", "any", ""]) | ANY_JSON
TOOL_CHOICE = TOOL_CHOICE | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})}
)


def _png(size: int, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (size, size), (200, 30, 90)), fmt)


PNG = _png(8)
IMAGE_BYTES = st.sampled_from([PNG, PNG[:30], PNG[:-5], b"GIF89a", b"BM" + b"\0" * 40, b""])
IMAGE_BYTES = IMAGE_BYTES | st.binary(max_size=200)
DATA_URLS = st.builds(
    lambda mime, data, breakage: breakage(data_url(data, mime)),
    st.sampled_from(["image/png", "image/gif", "image/ppm", "text/plain", "", "image/png;x=1"]),
    IMAGE_BYTES,
    st.sampled_from([
        lambda u: u,
        lambda u: u.replace(";base64", ""),  # percent-decoded, not base64
        lambda u: u[:-3],  # cut padding
        lambda u: u + "!!",
        lambda u: u.replace("base64,", "base64,@@"),
        lambda u: u.replace(",", ""),
        lambda u: u.replace("data:", "DATA:"),
        lambda u: u[: len(u) // 2] + " \n" + u[len(u) // 2 :],
    ]),
)  # fmt: skip
IMAGE_URL = DATA_URLS | st.sampled_from(SAFE_URLS)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT | ANY_JSON}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": IMAGE_URL
            | st.fixed_dictionaries({"url": IMAGE_URL}, optional={"detail": ANY_JSON}),
        },
    ),  # fmt: skip
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "video", "", "TEXT"])}),
    ANY_JSON,
)
CONTENT = ODD_TEXT | st.none() | st.lists(PART, max_size=3) | ANY_JSON
TOOL_CALL = st.fixed_dictionaries(
    {"function": st.fixed_dictionaries(
        {"name": NAMES}, optional={"arguments": ODD_TEXT | ANY_JSON | st.just('{"a": ')})},
    optional={"id": ODD_TEXT, "type": st.just("function") | ANY_JSON},
) | ANY_JSON  # fmt: skip
MESSAGE = (
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | st.sampled_from(["", "USER", "robot"]) | ANY_JSON},
        optional={
            "content": CONTENT,
            "name": ODD_TEXT | ANY_JSON,
            "tool_call_id": ODD_TEXT | ANY_JSON,
            "reasoning_content": ODD_TEXT | ANY_JSON,
            "tool_calls": st.lists(TOOL_CALL, max_size=2) | ANY_JSON,
        },
    )
    | ANY_JSON
)
# Shapes of `response_format`, with schemas xgrammar refuses (the router's 400), odd ones it
# takes (the workers constrain those), and random JSON.
SCHEMAS = st.sampled_from([
    {"type": "wizard"}, {"$ref": "#"}, {"type": "string", "pattern": "[a-"}, {"enum": []},
    {"type": "string", "minLength": 10**9}, {"not": {}}, {"anyOf": []}, {}, True, False,
    {"type": "object", "properties": {"a": {"$ref": "#"}}},
    {"type": "array", "minItems": 3, "maxItems": 1}, {"const": "\x00"},
]) | ANY_JSON  # fmt: skip
RESPONSE_FORMAT = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema"]) | ODD_TEXT},
    optional={"json_schema": st.fixed_dictionaries(
        {}, optional={"name": NAMES, "schema": SCHEMAS, "strict": st.booleans() | ANY_JSON}
    ) | ANY_JSON},
)  # fmt: skip
CHAT_BODY = st.builds(
    lambda required, optional, unknown: {**unknown, **required, **optional},
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=4) | ANY_JSON}),
    st.fixed_dictionaries(
        {},
        optional={
            **SAMPLING,
            "max_completion_tokens": hostile_number(st.integers(1, 2)),
            "logprobs": st.booleans() | ANY_JSON,
            "top_logprobs": hostile_number(st.integers(0, 20)),
            "tools": st.lists(TOOL, max_size=3) | ANY_JSON,
            "tool_choice": TOOL_CHOICE,
            "parallel_tool_calls": st.booleans() | ANY_JSON,
            "chat_template_kwargs": st.dictionaries(
                st.sampled_from(["thinking", "enable_thinking", "tools", "x"]),
                st.sampled_from([True, False, "true", "off", "maybe", None, 1]),
                max_size=2,
            ) | ANY_JSON,
            "response_format": RESPONSE_FORMAT | ANY_JSON,
            "extra_body": st.fixed_dictionaries({}, optional=SAMPLING) | ANY_JSON,
        },
    ),
    UNKNOWN,
)  # fmt: skip
# Well-formed chats of odd content: every role in a plausible order, tools with odd schemas and
# names, valid sampling. These get past the gateway, so they exercise the router's rendering,
# tool-choice forcing and output parsing; most answer 200.
PLAIN_TEXT = st.text(min_size=1, max_size=30) | ODD_TEXT.filter(bool)
ARGUMENTS = st.sampled_from(['{"city": "Oslo"}', "{}", '{"a": ', "[]", "null", ""])
ARGUMENTS = ARGUMENTS | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)
CALLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function"),
         "function": st.fixed_dictionaries({"name": NAMES.filter(bool), "arguments": ARGUMENTS})},
        optional={"id": PLAIN_TEXT},
    ),
    min_size=1, max_size=2,
)  # fmt: skip
TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": PLAIN_TEXT}),
                      min_size=1, max_size=2)  # fmt: skip
PLAIN_CONTENT = PLAIN_TEXT | TEXT_PARTS
TURN = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]),
                           "content": PLAIN_CONTENT}),
    st.fixed_dictionaries({"role": st.just("user"), "content": PLAIN_CONTENT},
                          optional={"name": PLAIN_TEXT}),
    st.fixed_dictionaries({"role": st.just("assistant")},
                          optional={"content": PLAIN_TEXT | st.none(),
                                    "reasoning_content": PLAIN_TEXT, "tool_calls": CALLS}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": PLAIN_CONTENT,
                           "tool_call_id": PLAIN_TEXT}),
    st.fixed_dictionaries({"role": st.just("function"), "content": PLAIN_TEXT,
                           "name": PLAIN_TEXT}),
)  # fmt: skip
VALID_TOOL = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": NAMES.filter(bool)},
                                       optional={"description": ODD_TEXT,
                                                 "parameters": _schemas()})},
)  # fmt: skip


@st.composite
def well_formed_chats(draw):
    turns = draw(st.lists(TURN, max_size=4))
    body = {"messages": [*turns, {"role": "user", "content": draw(PLAIN_CONTENT)}]}
    body["max_tokens"] = draw(st.integers(1, 2))
    tools = draw(st.lists(VALID_TOOL, max_size=3))
    if tools:
        body["tools"] = tools
        names = [t["function"]["name"] for t in tools]
        named = st.sampled_from(names).map(lambda n: {"type": "function", "function": {"name": n}})
        body["tool_choice"] = draw(st.sampled_from(["none", "auto", "required"]) | named)
        body["parallel_tool_calls"] = draw(st.booleans())
    optional = st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
            "min_p": st.floats(0, 1), "seed": st.integers(-(2**63), 2**63 - 1),
            "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
            "n": st.integers(1, 3), "stop": st.lists(PLAIN_TEXT, max_size=3),
            "stop_token_ids": st.lists(st.integers(0, 2047), max_size=3),
            "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(),
            "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()}),
            "logprobs": st.just(True), "stream": st.booleans(),
        },
    )  # fmt: skip
    body.update(draw(optional))
    if body.get("logprobs"):
        body["top_logprobs"] = draw(st.integers(0, 20))
    if body.get("stream"):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


TOKEN_IDS = st.lists(st.integers(-3, 2100), min_size=0, max_size=8)
COMPLETION_BODY = st.builds(
    lambda required, optional: {**required, **optional},
    st.fixed_dictionaries(
        {
            "prompt": ODD_TEXT
            | TOKEN_IDS
            | st.lists(ODD_TEXT, max_size=2)
            | st.lists(TOKEN_IDS, max_size=2)
            | ANY_JSON
        }  # fmt: skip
    ),
    st.fixed_dictionaries(
        {},
        optional={
            **SAMPLING,
            "logprobs": hostile_number(st.integers(0, 5)),
            "echo": st.booleans() | ANY_JSON,
            "suffix": ODD_TEXT | ANY_JSON,
        },
    ),  # fmt: skip
)
TOKENIZE_BODY = st.fixed_dictionaries(
    {},
    optional={
        "prompt": ODD_TEXT | ANY_JSON,
        "messages": st.lists(MESSAGE, max_size=3) | ANY_JSON,
        "tools": st.lists(TOOL, max_size=2) | ANY_JSON,
        "add_generation_prompt": st.booleans() | ANY_JSON,
        "continue_final_message": st.booleans(),
        "return_token_strs": st.booleans() | ANY_JSON,
        "return_text": st.booleans(),
        "chat_template_kwargs": ANY_JSON,
    },
)
DETOKENIZE_BODY = st.fixed_dictionaries({"tokens": TOKEN_IDS | ANY_JSON}) | ANY_JSON


def bounded(body):
    """The body with whatever would generate many tokens cut down: one or two tokens per sample,
    at most four samples (also inside `extra_body`). Invalid values are left as they are."""
    if not isinstance(body, dict):
        return body
    for fields in (body, body.get("extra_body")):
        if not isinstance(fields, dict):
            continue
        for key, limit in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 4)):
            if _as_count(fields.get(key)) > limit:
                fields[key] = limit
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # a chat without a limit generates to the end of the context
    return body


def _as_count(value) -> float:
    """The integer pydantic would read from `value` (lax mode), or 0."""
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() and len(value) < 12 else 0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return value
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ---------------------------------------------------------------- byte-level breakage

VALID_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 1,
        "temperature": 0.5,
        "stop": ["x"],
    }  # fmt: skip
).encode()
NUMBER_AT = VALID_BODY.index(b"0.5")


def _invalid_utf8(body: bytes, position: int, junk: bytes) -> bytes:
    inside = body.index(b"Hi there") + position % 8  # inside a string, where a parser decodes
    return body[:inside] + junk + body[inside:]


BYTE_MUTATIONS = {
    "truncated": lambda body, k, junk: body[: k % len(body)],
    "invalid utf-8": _invalid_utf8,
    "random bytes": lambda body, k, junk: junk,
    "bare number": lambda body, k, junk: body[:NUMBER_AT] + junk + body[NUMBER_AT + 3 :],
    "not an object": lambda body, k, junk: [b"[]", b"null", b"1", b'"x"', b"true", b""][k % 6],
    "deep nesting": lambda body, k, junk: (
        body[:-1] + b',"x":' + b"[" * (k % 3000) + b"]" * (k % 3000) + b"}"
    ),
    "utf-16": lambda body, k, junk: body.decode().encode(["utf-16", "utf-32", "utf-8-sig"][k % 3]),
    "duplicate keys": lambda body, k, junk: body[:-1] + b',"messages":' + junk[:8] + b"}",
    "escaped surrogate": lambda body, k, junk: body.replace(b"Hi there", b"\\ud800\\udfff\\ud83d"),
    "raw control": lambda body, k, junk: body.replace(b"Hi there", b"a\x00b\nc\td"),
}
BARE_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"0x10",
                b"01", b"1.", b".5", b"+1", b"1e-999", b"-0"]  # fmt: skip
INVALID_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82",
                b"\xf0\x9f\x98"]  # fmt: skip
