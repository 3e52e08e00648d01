"""Template and tokenizer through the live stack: `/tokenize` and `/detokenize`, the worked
examples of kimi_k25.md section 9.4 byte for byte, and the thinking switch (K19) with the
template and the reasoning parser agreeing on every spelling of it.

Agreement is checked on the real output: the generated token ids are recovered from the
log-probabilities' bytes, parsed here with the switch the prompt was rendered with, and compared
with what the server returned.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from test_chat_template import WEATHER_TOOL, WEATHER_TS

from shared.parsers import ChatOutputParser, MarkerTable
from shared.tokenizer import KimiTokenizer

MODEL = "moonshotai/Kimi-K2.5"
CONTEXT_LENGTH = 32768
DEFAULT_SYSTEM = (
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
    "<|im_end|>"
)
SYSTEM_HI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
]
SYSTEM_HI_TEXT = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
    "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
)
WEATHER_CALL = {
    "id": "functions.get_weather:0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location": "New York, NY"}'},
}
WORKED_EXAMPLES = {
    "thinking": ({"messages": SYSTEM_HI}, SYSTEM_HI_TEXT + "<think>"),
    "instant": (
        {"messages": SYSTEM_HI, "chat_template_kwargs": {"thinking": False}},
        SYSTEM_HI_TEXT + "<think></think>",
    ),
    "multi_turn": (
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Add."},
                {"role": "user", "content": "Thanks"},
            ]
        },
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>The answer is 4.<|im_end|>"
        "<|im_user|>user<|im_middle|>Thanks<|im_end|><|im_assistant|>assistant<|im_middle|><think>",
    ),
    "tools_and_one_tool_round": (
        {
            "tools": [WEATHER_TOOL],
            "messages": [
                SYSTEM_HI[0],
                {"role": "user", "content": "What's the weather in NYC?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [WEATHER_CALL],
                    "reasoning_content": "I need to check the weather in New York City.",
                },
                {
                    "role": "tool",
                    "name": "get_weather",
                    "tool_call_id": "functions.get_weather:0",
                    "content": '{"temperature": 72, "condition": "sunny"}',
                },
            ],
        },
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
        "<|im_assistant|>assistant<|im_middle|><think>",
    ),
    "image_in_user_message": (
        {
            "add_generation_prompt": False,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "text", "text": "Describe this image."},
                    ],
                }
            ],
        },
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|><|media_begin|>image<|media_content|>"
        "<|media_pad|><|media_end|>\nDescribe this image.<|im_end|>",
    ),
    "k26_tool_name_and_object_arguments": (
        {
            "messages": [
                {"role": "user", "content": "Price of ACME?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "functions.lookup_stock:0",
                            "type": "function",
                            "function": {"name": "lookup_stock", "arguments": {"ticker": "ACME"}},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "name": "lookup_stock",
                    "tool_call_id": "functions.lookup_stock:0",
                    "content": '{"price": 12.5}',
                },
            ]
        },
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>Price of ACME?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.lookup_stock:0<|tool_call_argument_begin|>"
        '{"ticker": "ACME"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>lookup_stock<|im_middle|>## Return of functions.lookup_stock:0\n"
        '{"price": 12.5}<|im_end|><|im_assistant|>assistant<|im_middle|><think>',
    ),
    "developer_role_is_system": (
        {"messages": [{"role": "developer", "content": "Be brief."}, SYSTEM_HI[1]]},
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi"
        "<|im_end|><|im_assistant|>assistant<|im_middle|><think>",
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> KimiTokenizer:
    return KimiTokenizer.from_dir(tiny_checkpoint)


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json={"model": MODEL, **body}, timeout=60)


# ---------------------------------------------------------------- /tokenize and /detokenize


@pytest.mark.parametrize("name", list(WORKED_EXAMPLES))
def test_spec_9_4_worked_examples_through_tokenize(stack, tokenizer, name):
    body, expected = WORKED_EXAMPLES[name]
    answer = post(stack, "/tokenize", {**body, "return_text": True, "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["text"] == expected
    assert data["tokens"] == tokenizer.encode(expected) and data["count"] == len(data["tokens"])
    assert data["max_model_len"] == CONTEXT_LENGTH
    assert "".join(data["token_strs"]) == expected  # all ASCII or whole characters here
    detokenized = post(stack, "/detokenize", {"tokens": data["tokens"]}).json()
    assert detokenized == {"prompt": expected}


def test_tokenize_text_prompt_and_vllm_shape(stack, tokenizer):
    text = "Hello <|im_end|> 世界"
    data = post(stack, "/tokenize", {"prompt": text, "add_special_tokens": True}).json()
    assert set(data) == {"count", "max_model_len", "tokens", "token_strs"}
    assert data["tokens"] == tokenizer.encode(text) and data["token_strs"] is None
    assert tokenizer.token_id("<|im_end|>") in data["tokens"]  # specials are recognised


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"prompt": "a", "continue_final_message": True}, "continue_final_message"),
        (
            {"messages": SYSTEM_HI, "chat_template_kwargs": {"thinking": "maybe"}},
            "chat_template_kwargs",
        ),
    ],
)
def test_tokenize_errors_are_400(stack, body, param):
    answer = post(stack, "/tokenize", body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


# ---------------------------------------------------------------- thinking switch (K19)


THINKING_SPELLINGS = [
    ({}, True),
    ({"chat_template_kwargs": {"thinking": True}}, True),
    ({"chat_template_kwargs": {"thinking": False}}, False),
    ({"chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"chat_template_kwargs": {"thinking": "false"}}, False),
    ({"chat_template_kwargs": {"enable_thinking": "True"}}, True),
    ({"chat_template_kwargs": {"thinking": {"type": "disabled"}}}, False),
    ({"extra_body": {"chat_template_kwargs": {"thinking": False}}}, False),
]


def generated_ids(tokenizer: KimiTokenizer, entries: list[dict]) -> list[int]:
    """The token ids of log-probability entries (each token's bytes are unique)."""
    by_bytes = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    return [by_bytes[bytes(e["bytes"])] for e in entries]


def expected_split(tokenizer: KimiTokenizer, ids: list[int], thinking: bool):
    """What the router's parser must make of `ids` with this thinking switch."""
    markers = MarkerTable.from_tokenizer(tokenizer)
    visible = [i for i in ids if not tokenizer.is_skippable(i) or i in markers.by_id]
    parsed = ChatOutputParser(markers, thinking=thinking, parse_tools=False).parse(
        visible, tokenizer.decode(visible)
    )
    return parsed.reasoning or None, parsed.content or None


@pytest.mark.parametrize(("fields", "thinking"), THINKING_SPELLINGS)
@pytest.mark.parametrize("stream", [False, True])
def test_k19_template_and_parser_agree(stack, tokenizer, fields, thinking, stream):
    text = post(stack, "/tokenize", {"messages": SYSTEM_HI, "return_text": True, **fields})
    ending = "<think>" if thinking else "<think></think>"
    assert text.json()["text"] == SYSTEM_HI_TEXT + ending

    body = {"messages": SYSTEM_HI, "max_tokens": 16, "seed": 21, "logprobs": True, **fields}
    if stream:
        reasoning, content, entries = _streamed(stack, body)
    else:
        answer = post(stack, "/v1/chat/completions", body).json()
        message = answer["choices"][0]["message"]
        reasoning, content = message["reasoning_content"], message["content"]
        entries = answer["choices"][0]["logprobs"]["content"]
    ids = generated_ids(tokenizer, entries)
    assert len(ids) == 16
    assert (reasoning, content) == expected_split(tokenizer, ids, thinking)
    assert (reasoning is not None) == thinking  # this seed's output has no think markers


def _streamed(stack, body: dict) -> tuple[str | None, str | None, list[dict]]:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
    extra = {k: v for k, v in body.items() if k in ("chat_template_kwargs", "extra_body")}
    fields = {k: v for k, v in body.items() if k not in extra}
    # The openai client spreads `extra_body` into the top level, as most clients do.
    extra_body = extra.get("extra_body") or extra or None
    stream = client.chat.completions.create(
        model=MODEL, stream=True, extra_body=extra_body, **fields
    )
    reasoning = content = ""
    entries = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        if chunk.choices[0].logprobs:
            entries += [e.model_dump() for e in chunk.choices[0].logprobs.content]
    return reasoning or None, content or None, entries


@pytest.mark.parametrize(
    "kwargs",
    [{"thinking": "maybe"}, {"thinking": 2}, {"thinking": True, "enable_thinking": False}],
)
@pytest.mark.parametrize("stream", [False, True])
def test_k19_bad_thinking_value_is_400(stack, kwargs, stream):
    body = {"messages": SYSTEM_HI, "chat_template_kwargs": kwargs, "stream": stream}
    answer = post(stack, "/v1/chat/completions", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "chat_template_kwargs" and error["type"] == "invalid_request_error"
