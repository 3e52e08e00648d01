"""Chat template: spec section 9 worked examples byte for byte, TypeScript tool declarations,
and the chat-template failure cases (K19, K24-K30) of cases.md."""

from __future__ import annotations

import pytest

from shared.chat_template import (
    DEFAULT_TEMPLATE_PATH,
    _compile,
    load_chat_template,
    parse_bool,
    render_chat,
    resolve_thinking,
)
from shared.tool_declaration_ts import deep_sort, encode_tools_to_typescript

TEMPLATE = DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8")
DEFAULT_SYSTEM = (
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
    "<|im_end|>"
)
GEN_THINK = "<|im_assistant|>assistant<|im_middle|><think>"
GEN_INSTANT = "<|im_assistant|>assistant<|im_middle|><think></think>"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA",
                },
                "unit": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"],
                    "description": "Temperature unit",
                },
            },
            "required": ["location"],
        },
    },
}
WEATHER_TS = (
    "# Tools\n\n## functions\nnamespace functions {\n"
    "// Get the current weather for a location\n"
    "type get_weather = (_: {\n"
    "  // The city and state, e.g. San Francisco, CA\n"
    "  location: string,\n"
    "  // Temperature unit\n"
    '  unit?: "celsius" | "fahrenheit"\n'
    "}) => any;\n"
    "}\n"
)
STOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_stock",
        "description": "Get a stock quote",
        "parameters": {
            "type": "object",
            "properties": {"ticker": {"type": "string"}},
            "required": ["ticker"],
        },
    },
}
STOCK_DECLARATION = (
    "<|im_system|>tool_declare<|im_middle|># Tools\n\n## functions\nnamespace functions {\n"
    "// Get a stock quote\ntype lookup_stock = (_: {\n  ticker: string\n}) => any;\n}\n"
    "<|im_end|>"
)
SYSTEM_HI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
]


def _call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- spec section 9.4 worked examples -------------------------------------------------------


def test_spec_9_4_thinking_mode():
    assert render_chat(TEMPLATE, SYSTEM_HI) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    )


def test_spec_9_4_instant_mode():
    assert render_chat(TEMPLATE, SYSTEM_HI, thinking=False) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>"
    )


def test_spec_9_4_multi_turn_drops_earlier_reasoning():
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Add them."},
        {"role": "user", "content": "Thanks"},
    ]
    prompt = render_chat(TEMPLATE, messages)
    assert (
        "<|im_assistant|>assistant<|im_middle|><think></think>The answer is 4.<|im_end|>" in prompt
    )
    assert "Add them." not in prompt


def test_spec_9_4_tools_and_one_tool_round():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in NYC?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I need to check the weather in New York City.",
            "tool_calls": [
                _call("functions.get_weather:0", "get_weather", '{"location": "New York, NY"}')
            ],
        },
        {
            "role": "tool",
            "name": "get_weather",
            "tool_call_id": "functions.get_weather:0",
            "content": '{"temperature": 72, "condition": "sunny"}',
        },
    ]
    assert render_chat(TEMPLATE, messages, tools=[WEATHER_TOOL]) == (
        f"<|im_system|>tool_declare<|im_middle|>{WEATHER_TS}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>What's the weather in NYC?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
        "<think>I need to check the weather in New York City.</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"location": "New York, NY"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
        '{"temperature": 72, "condition": "sunny"}<|im_end|>'
        "<|im_assistant|>assistant<|im_middle|><think>"
    )


def test_spec_9_4_image_in_user_message():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    prompt = render_chat(TEMPLATE, messages, add_generation_prompt=False)
    assert prompt == DEFAULT_SYSTEM + (
        "<|im_user|>user<|im_middle|><|media_begin|>image<|media_content|><|media_pad|>"
        "<|media_end|>\nDescribe this image.<|im_end|>"
    )


def test_spec_9_3_typescript_example():
    assert encode_tools_to_typescript([WEATHER_TOOL]) == WEATHER_TS


# --- cases.md, chat-template group --------------------------------------------------------


def test_k24_history_reasoning_dropped():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "OLD_REASONING"},
        {"role": "user", "content": "3+3?"},
    ]
    assert render_chat(TEMPLATE, messages, add_generation_prompt=True) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>2+2?"
        "<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"
        "<|im_user|>user<|im_middle|>3+3?<|im_end|>" + GEN_THINK
    )


def _stock_loop(assistant_extra: dict) -> list[dict]:
    return [
        {"role": "user", "content": "Price of ACME?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("functions.lookup_stock:0", "lookup_stock", '{"ticker": "ACME"}')],
            **assistant_extra,
        },
        {
            "role": "tool",
            "tool_call_id": "functions.lookup_stock:0",
            "content": '{"price": 12.5}',
        },
    ]


def _stock_expected(think: str) -> str:
    return (
        STOCK_DECLARATION + DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>Price of ACME?<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{think}<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.lookup_stock:0<|tool_call_argument_begin|>"
        '{"ticker": "ACME"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.lookup_stock:0\n"
        '{"price": 12.5}<|im_end|>' + GEN_THINK
    )


def test_k24_current_tool_loop_reasoning_kept():
    messages = _stock_loop({"reasoning_content": "Need the quote tool."})
    prompt = render_chat(TEMPLATE, messages, tools=[STOCK_TOOL])
    assert prompt == _stock_expected("<think>Need the quote tool.</think>")


def test_k24_thinking_off_drops_current_reasoning_too():
    messages = _stock_loop({"reasoning_content": "Need the quote tool."})
    prompt = render_chat(TEMPLATE, messages, tools=[STOCK_TOOL], thinking=False)
    assert "Need the quote tool." not in prompt
    assert prompt.endswith(GEN_INSTANT)


@pytest.mark.parametrize("extra", [{}, {"reasoning_content": None}, {"reasoning_content": ""}])
def test_k25_tool_call_history_without_reasoning_content(extra):
    prompt = render_chat(TEMPLATE, _stock_loop(extra), tools=[STOCK_TOOL])
    assert prompt == _stock_expected("<think></think>")
    assert "None" not in prompt


def test_k26_tool_role_uses_name_and_object_arguments_use_json_dumps():
    messages = [
        {"role": "user", "content": "Price of ACME?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("functions.lookup_stock:0", "lookup_stock", {"ticker": "ACME"})],
        },
        {
            "role": "tool",
            "name": "lookup_stock",
            "tool_call_id": "functions.lookup_stock:0",
            "content": '{"price": 12.5}',
        },
    ]
    assert render_chat(TEMPLATE, messages) == (
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>Price of ACME?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.lookup_stock:0<|tool_call_argument_begin|>"
        '{"ticker": "ACME"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>lookup_stock<|im_middle|>## Return of functions.lookup_stock:0\n"
        '{"price": 12.5}<|im_end|>' + GEN_THINK
    )


def test_k26_user_name_fills_the_role_slot():
    prompt = render_chat(TEMPLATE, [{"role": "user", "name": "bob", "content": "hey"}])
    assert "<|im_user|>bob<|im_middle|>hey<|im_end|>" in prompt


def test_k26_missing_ids_follow_call_positions():
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"type": "function", "function": {"name": "b", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": "ra"},
        {"role": "tool", "content": "rb"},
    ]
    prompt = render_chat(TEMPLATE, messages)
    assert "<|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>" in prompt
    assert "<|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.a:0\nra<|im_end|>" in prompt
    assert "## Return of functions.b:1\nrb<|im_end|>" in prompt


@pytest.mark.parametrize(("thinking", "ending"), [(True, GEN_THINK), (False, GEN_INSTANT)])
def test_k28_generation_prompt_is_never_dropped(tiny_tokenizer, thinking, ending):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    prompt = render_chat(TEMPLATE, messages, tools=[WEATHER_TOOL], thinking=thinking)
    assert prompt.endswith("<|im_user|>user<|im_middle|>Weather in Oslo?<|im_end|>" + ending)
    special = tiny_tokenizer.token_id
    tail = [special("<|im_end|>"), special("<|im_assistant|>")]
    tail += [*tiny_tokenizer.encode("assistant"), special("<|im_middle|>"), special("<think>")]
    tail += [] if thinking else [special("</think>")]
    assert tiny_tokenizer.encode(prompt)[-len(tail) :] == tail


def test_k30_content_as_list_of_parts():
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Rule A. "}, {"type": "text", "text": "Rule B."}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
            ],
        },
    ]
    media = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
    assert render_chat(TEMPLATE, messages, add_generation_prompt=True) == (
        "<|im_system|>system<|im_middle|>Rule A. Rule B.<|im_end|>"
        f"<|im_user|>user<|im_middle|>Compare {media}and{media}<|im_end|>" + GEN_THINK
    )


def test_k30_video_part_becomes_the_placeholder():
    content = [{"type": "video_url", "video_url": {"url": "x.mp4"}}, {"type": "text", "text": "?"}]
    prompt = render_chat(TEMPLATE, [{"role": "user", "content": content}])
    assert "<|im_middle|><|kimi_k25_video_placeholder|>?<|im_end|>" in prompt


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"enable_thinking": False}, False),  # (a) alias
        ({"thinking": "false"}, False),  # (b) string boolean
        (None, True),  # (c) omitted: on
        ({}, True),
        ({"thinking": "False"}, False),
        ({"thinking": "0"}, False),
        ({"thinking": 0}, False),
        ({"thinking": "true"}, True),
        ({"enable_thinking": "True"}, True),
        ({"thinking": None, "enable_thinking": False}, False),
        ({"thinking": {"type": "disabled"}}, False),
        ({"thinking": False, "enable_thinking": "false"}, False),
    ],
)
def test_k19_thinking_switch_resolution(kwargs, expected):
    thinking = resolve_thinking(kwargs)
    assert thinking is expected
    prompt = render_chat(TEMPLATE, SYSTEM_HI, thinking=thinking)
    assert prompt.endswith(GEN_THINK if expected else GEN_INSTANT)


@pytest.mark.parametrize(
    "kwargs",
    [{"thinking": "maybe"}, {"thinking": 2}, {"thinking": True, "enable_thinking": False}],
)
def test_k19_bad_or_conflicting_thinking_is_rejected(kwargs):
    with pytest.raises(ValueError):
        resolve_thinking(kwargs)


def test_k19_template_itself_reads_string_booleans_and_the_alias():
    """Rendered by a plain Jinja caller (e.g. Hugging Face) the template still agrees."""
    template = _compile(TEMPLATE)
    base = {"messages": SYSTEM_HI, "add_generation_prompt": True}
    assert template.render(**base, thinking="false").endswith(GEN_INSTANT)
    assert template.render(**base, enable_thinking=False).endswith(GEN_INSTANT)
    assert template.render(**base).endswith(GEN_THINK)
    assert render_chat(TEMPLATE, SYSTEM_HI, thinking="False").endswith(GEN_INSTANT)


# --- template details -----------------------------------------------------------------------


def test_no_generation_prompt_when_not_asked():
    prompt = render_chat(TEMPLATE, SYSTEM_HI, add_generation_prompt=False)
    assert prompt.endswith("<|im_user|>user<|im_middle|>Hi<|im_end|>")


def test_empty_conversation_gets_the_default_system_prompt():
    assert render_chat(TEMPLATE, [], add_generation_prompt=False) == DEFAULT_SYSTEM


def test_message_text_is_not_evaluated_as_template():
    prompt = render_chat(TEMPLATE, [{"role": "user", "content": "{{ 7*7 }} {% if x %}"}])
    assert "<|im_middle|>{{ 7*7 }} {% if x %}<|im_end|>" in prompt


def test_tools_fall_back_to_sorted_json_when_typescript_fails():
    tool = {
        "type": "function",
        "function": {
            "parameters": {"type": "object", "properties": {"n": {"type": "string", "enum": [1]}}},
            "name": "bad",
        },
    }
    prompt = render_chat(TEMPLATE, [{"role": "user", "content": "x"}], tools=[tool])
    assert prompt.startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"function": {"name": "bad", "parameters": '
        '{"properties": {"n": {"enum": [1], "type": "string"}}, "type": "object"}}, '
        '"type": "function"}]<|im_end|>'
    )


def test_load_chat_template_from_checkpoint_dir(tiny_tokenizer_dir):
    assert load_chat_template(tiny_tokenizer_dir) == TEMPLATE


def test_parse_bool():
    assert parse_bool(True) is True and parse_bool(" yes ") is True and parse_bool("OFF") is False
    with pytest.raises(ValueError, match="thinking must be a boolean"):
        parse_bool([], "thinking")


def test_deep_sort_sorts_nested_keys_and_keeps_list_order():
    value = {"b": [{"z": 1, "a": 2}, 3], "a": {"d": 1, "c": 2}}
    assert repr(deep_sort(value)) == "{'a': {'c': 2, 'd': 1}, 'b': [{'a': 2, 'z': 1}, 3]}"


def test_typescript_schema_features():
    tool = {
        "type": "function",
        "function": {
            "name": "plot",
            "description": "Plot things\nsecond line",
            "parameters": {
                "type": "object",
                "properties": {
                    "b_opt": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 10,
                        "default": 5,
                        "description": "Count",
                    },
                    "a_req": {"type": "array", "items": {"type": "string", "description": "A tag"}},
                    "c": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "d": {"$ref": "#/$defs/Point"},
                    "e": {"type": ["string", "null"], "default": "x"},
                    "f": {
                        "type": "object",
                        "properties": {"x": {"type": "number"}},
                        "required": ["x"],
                        "additionalProperties": False,
                    },
                    "g": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                },
                "required": ["d", "a_req"],
                "$defs": {
                    "Point": {
                        "type": "object",
                        "description": "A point",
                        "properties": {"y": {"type": "number"}, "x": {"type": "number"}},
                        "required": ["x", "y"],
                    }
                },
            },
        },
    }
    assert encode_tools_to_typescript([tool, {"type": "retrieval"}]) == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "// A point\ninterface Point {\n  x: number,\n  y: number\n}\n"
        "// Plot things\n// second line\n"
        "type plot = (_: {\n"
        "  a_req: Array<\n    // A tag\n    string\n  >,\n"
        "  d: Point,\n"
        "  // Count\n  // maximum: 10, minimum: 1\n  // Default: 5\n  b_opt?: number,\n"
        "  c?: string | null,\n"
        '  // Default: "x"\n  e?: string | null,\n'
        "  f?: {\n    x: number,\n    [k: string]: never\n  },\n"
        "  // maxItems: 3\n  g?: Array<boolean>\n"
        "}) => any;\n}\n"
    )


def test_typescript_of_no_function_tools_is_empty():
    assert encode_tools_to_typescript([]) == ""
    assert encode_tools_to_typescript([{"type": "web_search"}]) == ""
    no_params = {"type": "function", "function": {"name": "ping"}}
    assert encode_tools_to_typescript([no_params]).endswith("type ping = (_: {}) => any;\n}\n")
