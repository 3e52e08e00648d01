"""The gateway's chat and text completions, models and health, against a scripted router
(`gateway_harness`): translation to the router's wire format and OpenAI's response framing."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from gateway_harness import (
    CALL_ID,
    CHAT,
    EXPECTED_CALLS,
    HELLO,
    MODEL,
    TOOL_SCRIPT,
    TWO_CHOICE_SCRIPT,
    USAGE,
    USAGE_JSON,
    WEATHER_TOOL,
    chat_body,
    chunk,
    client,
    delta,
    merge_stream,
    post,
    sse_payloads,
)

# ---------------------------------------------------------------- chat completions


def test_chat_non_streaming_reasoning_content_and_tool_calls(router, gateway):
    router.script = TOOL_SCRIPT
    answer = client(gateway).chat.completions.create(
        model=MODEL, messages=HELLO, tools=[WEATHER_TOOL]
    )
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == MODEL and answer.created > 0
    (choice,) = answer.choices
    assert choice.index == 0 and choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant" and choice.message.content == "Checking. "
    assert choice.message.reasoning_content == "Need the weather."
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls == EXPECTED_CALLS
    assert all(c.type == "function" for c in choice.message.tool_calls)
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (20, 12, 32)
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.prompt_tokens_details.cached_tokens == 8

    (sent,) = router.requests
    assert sent.request_id == answer.id and sent.n == 1
    assert [(m.role, m.content) for m in sent.messages] == [("user", "hi")]
    assert json.loads(sent.tools_json) == [WEATHER_TOOL]
    assert sent.tool_choice_json == "" and sent.chat_template_kwargs_json == ""
    # Fields the client left out travel unset: the router applies the model's defaults.
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        assert not sent.sampling.HasField(name), name
    assert sent.sampling.max_tokens == 0 and not sent.HasField("parallel_tool_calls")
    assert sent.skip_special_tokens and not sent.HasField("prompt")


async def _stream_async(url, **kwargs):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(model=MODEL, stream=True, **kwargs)
        return [item async for item in stream]


def test_chat_streaming_matches_non_streaming(router, gateway):
    router.script = TOOL_SCRIPT
    chunks = asyncio.run(_stream_async(gateway, messages=HELLO, tools=[WEATHER_TOOL]))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    state = merge_stream(chunks)[0]
    assert state["reasoning"] == "Need the weather." and state["content"] == "Checking. "
    assert [tuple(state["calls"][i]) for i in sorted(state["calls"])] == EXPECTED_CALLS
    assert state["finish"] == "tool_calls"
    # The finish reason comes alone, in the last choice chunk.
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streamed_tool_call_deltas_carry_id_and_name_once(router, gateway):
    router.script = TOOL_SCRIPT
    payloads = sse_payloads(gateway, chat_body(stream=True))
    calls = [call for p in payloads[:-1] for call in p["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c.get("id"), c.get("type")) for c in calls] == [
        (0, CALL_ID, "function"),
        (0, None, None),
        (1, "functions.get_time:1", "function"),
    ]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": '}
    assert calls[1]["function"] == {"arguments": '"Oslo"}'}


def test_k40_include_usage_chunk_after_finish_then_done(router, gateway):
    router.script = TOOL_SCRIPT
    body = chat_body(stream=True)
    payloads = sse_payloads(gateway, {**body, "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]"
    usage_chunk, finish_chunk, content_chunks = payloads[-2], payloads[-3], payloads[:-3]
    assert usage_chunk["object"] == "chat.completion.chunk" and usage_chunk["choices"] == []
    assert usage_chunk["usage"] == USAGE_JSON
    assert finish_chunk["choices"][0]["finish_reason"] == "tool_calls"
    assert all(p["usage"] is None for p in [*content_chunks, finish_chunk])
    non_streaming = post(gateway, chat_body()).json()
    assert non_streaming["usage"] == usage_chunk["usage"]

    plain = sse_payloads(gateway, body)
    assert plain[-1] == "[DONE]" and plain[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("usage" not in p for p in plain[:-1])


def test_k41_two_choices_keep_their_own_state(router, gateway):
    router.script = TWO_CHOICE_SCRIPT
    answer = client(gateway).chat.completions.create(model=MODEL, messages=HELLO, n=2)
    assert router.requests[0].n == 2
    first, second = answer.choices
    assert (first.index, second.index) == (0, 1)
    assert first.message.reasoning_content == "A thinks." and first.message.content == "A answers."
    assert first.message.tool_calls is None and first.finish_reason == "stop"
    assert second.message.reasoning_content == "B thinks." and second.message.content is None
    assert second.message.tool_calls[0].id == CALL_ID
    assert second.finish_reason == "tool_calls"

    stream = client(gateway).chat.completions.create(model=MODEL, messages=HELLO, n=2, stream=True)
    chunks = list(stream)
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    assert [c.choices[0].index for c in chunks[:2]] == [0, 1]
    states = merge_stream(chunks)
    assert states[0]["content"] == "A answers." and states[0]["finish"] == "stop"
    assert states[1]["reasoning"] == "B thinks." and states[1]["finish"] == "tool_calls"
    assert list(states[1]["calls"]) == [0]


LIMITS = [{"max_completion_tokens": 8}, {"max_tokens": 8}]
LIMITS += [{"max_tokens": 100, "max_completion_tokens": 8}]  # both given: the newer name wins


@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("stream", [False, True])
def test_k42_completion_limit_and_length_finish(router, gateway, limits, stream):
    router.script = [chunk(delta(reasoning="Count: a, b")), chunk(delta(finish="length"))]
    body = chat_body(stream=stream, **limits)
    if stream:
        finish = sse_payloads(gateway, body)[-2]["choices"][0]["finish_reason"]
    else:
        finish = post(gateway, body).json()["choices"][0]["finish_reason"]
    assert finish == "length"
    assert router.requests[0].sampling.max_tokens == 8  # max_completion_tokens wins


def test_extra_body_object_is_forwarded(router, gateway):
    extra = {"chat_template_kwargs": {"thinking": False, "a": 2}, "top_k": 20, "temperature": 1.5}
    extra["stop_token_ids"] = [163586]
    body = chat_body(temperature=0.6, chat_template_kwargs={"a": 1}, extra_body=extra)
    assert post(gateway, body).status_code == 200
    client(gateway).chat.completions.create(
        model=MODEL,
        messages=HELLO,
        extra_body={"chat_template_kwargs": {"thinking": True}, "min_p": 0.1, "top_k": 5},
    )
    literal, via_client = router.requests
    assert json.loads(literal.chat_template_kwargs_json) == {"thinking": False, "a": 1}
    assert literal.sampling.top_k == 20 and list(literal.sampling.stop_token_ids) == [163586]
    assert literal.sampling.temperature == pytest.approx(0.6)  # the top level wins
    assert json.loads(via_client.chat_template_kwargs_json) == {"thinking": True}
    assert via_client.sampling.top_k == 5
    assert via_client.sampling.min_p == pytest.approx(0.1)


def test_messages_and_sampling_translate_to_the_wire(router, gateway):
    image = "data:image/png;base64,AAAA"
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "image_url", "image_url": "https://example.com/b.png"},
    ]
    call = {"id": CALL_ID, "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = {"city": "Łódź"}  # an object, not a string
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Rule A. "}]},
        {"role": "user", "name": "bob", "content": parts},
        {"role": "assistant", "content": None, "reasoning_content": "Hm.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": '{"t": 3}'},
    ]
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    fields = {"tools": [WEATHER_TOOL], "tool_choice": tool_choice, "stop": "END", "seed": 7}
    fields |= {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1}
    fields |= {"logprobs": True, "top_logprobs": 3, "user": "u1", "unknown_field": {"x": 1}}
    fields |= {"parallel_tool_calls": False, "max_completion_tokens": 9, "temperature": 0}
    assert post(gateway, chat_body(messages=messages, **fields)).status_code == 200

    (sent,) = router.requests
    system, user, assistant, tool = sent.messages
    assert not system.HasField("content") and system.parts[0].text == "Rule A. "
    assert user.name == "bob" and [(p.type, p.text, p.image_url) for p in user.parts] == [
        ("text", "Compare", ""),
        ("image_url", "", image),
        ("image_url", "", "https://example.com/b.png"),
    ]
    assert not assistant.HasField("content") and assistant.reasoning_content == "Hm."
    (wire_call,) = assistant.tool_calls
    assert (wire_call.id, wire_call.name) == (CALL_ID, "get_weather")
    assert wire_call.arguments == '{"city": "Łódź"}'
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", CALL_ID, '{"t": 3}')
    assert json.loads(sent.tool_choice_json) == tool_choice and list(sent.stop) == ["END"]
    assert sent.HasField("parallel_tool_calls") and not sent.parallel_tool_calls
    assert sent.max_tokens_param == "max_completion_tokens"
    sampling = sent.sampling
    assert sampling.seed == 7 and sampling.logprobs and sampling.top_logprobs == 3
    assert (
        sampling.HasField("temperature") and sampling.temperature == 0 and sampling.max_tokens == 9
    )
    assert sampling.presence_penalty == 0.5 and sampling.frequency_penalty == -0.5
    assert sampling.repetition_penalty == pytest.approx(1.1)


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_response_format_travels_as_the_grammar(router, gateway, path):
    """`text` sends no grammar; the JSON kinds send theirs, the schema as ASCII JSON text (the
    router checks it and decides where it starts)."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Łódź"]}}, "required": ["city"]}
    formats = [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
    ]
    base = chat_body() if path == CHAT else {"model": MODEL, "prompt": "Once upon"}
    for response_format in formats:
        assert post(gateway, {**base, "response_format": response_format}, path).status_code == 200
    text, json_object, json_schema = (r.sampling for r in router.requests)
    assert not text.HasField("grammar")
    assert (json_object.grammar.kind, json_object.grammar.schema_json) == ("json_object", "")
    assert json_schema.grammar.kind == "json_schema"
    assert json.loads(json_schema.grammar.schema_json) == schema
    assert json_schema.grammar.schema_json.isascii()
    assert not json_schema.grammar.HasField("reasoning_end_token_id")


# ---------------------------------------------------------------- text completions


@pytest.mark.parametrize("prompt", ["Once upon", [11, 22, 33], [[11, 22]]])
def test_completions_text_or_token_ids(router, gateway, prompt):
    router.script = [chunk(delta(content=" a time")), chunk(delta(finish="stop"), usage=USAGE)]
    answer = client(gateway).completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == " a time" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == 32
    (sent,) = router.requests
    assert sent.sampling.max_tokens == 5 and not sent.messages
    if isinstance(prompt, str):
        assert sent.prompt == prompt
    else:
        expected_ids = prompt[0] if isinstance(prompt[0], list) else prompt
        assert not sent.HasField("prompt") and list(sent.prompt_token_ids) == expected_ids


def test_completions_streaming_with_echo_and_usage(router, gateway):
    router.script = [chunk(delta(content=" a")), chunk(delta(content=" time", finish="length"))]
    body = {"model": MODEL, "prompt": "Once upon", "stream": True, "echo": True}
    payloads = sse_payloads(
        gateway, {**body, "stream_options": {"include_usage": True}}, "/v1/completions"
    )
    texts = [p["choices"][0]["text"] for p in payloads[:-2]]
    assert "".join(texts) == "Once upon a time"
    assert payloads[-3]["choices"][0]["finish_reason"] == "length"
    assert payloads[-2]["choices"] == [] and payloads[-1] == "[DONE]"
    assert router.requests[0].sampling.max_tokens == 16  # OpenAI's default for completions


# ---------------------------------------------------------------- models and health


def test_models_and_health(router, gateway):
    (card,) = client(gateway).models.list().data
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "moonshotai")
    assert httpx.get(gateway + "/health").status_code == 200
    assert httpx.get(gateway + "/health/ready").status_code == 200
    router.ready = False
    not_ready = httpx.get(gateway + "/health/ready")
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"]
