"""The OpenAI API end to end on a live stack (gateway, router, prefill, decode processes) with the
real `openai` client, sync and async: n, stop strings, seeds, log-probabilities, completion
limits, finish reasons, usage, `tool_choice` and `parallel_tool_calls`.

The tiny checkpoint's random weights make the text meaningless, so the tests check exact
formats, ids and invariants: a stop string's effect is checked against the same seeded run
without it, and log-probabilities against probability theory.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

MODEL = "moonshotai/Kimi-K2.5"
HI = [{"role": "user", "content": "Hi"}]
INSTANT = {"chat_template_kwargs": {"thinking": False}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CONTEXT_LENGTH = 32768  # the router's default for the tiny checkpoint


def chat(client, stream=False, messages=HI, **kwargs):
    """A chat completion; streamed ones come back merged into the non-streaming shape."""
    kwargs = {"max_tokens": 12, **kwargs}
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    options = {"include_usage": True}
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options=options, **kwargs
        )
    )
    return merge(chunks)


def merge(chunks) -> dict:
    """Streamed chunks per choice: text, tool calls, logprobs, finish reasons; plus usage."""
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    out: dict = {"usage": chunks[-1].usage, "choices": {}}
    for choice in (c for chunk in chunks[:-1] for c in chunk.choices):
        state = out["choices"].setdefault(
            choice.index,
            {"reasoning": "", "content": "", "calls": {}, "logprobs": [], "finish": []},
        )
        state["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
        state["content"] += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            slot = state["calls"].setdefault(call.index, {"id": call.id, "name": "", "args": ""})
            slot["name"] += call.function.name or ""
            slot["args"] += call.function.arguments or ""
        state["logprobs"] += choice.logprobs.content if choice.logprobs else []
        state["finish"] += [choice.finish_reason] if choice.finish_reason else []
    return out


def text_of(choice) -> tuple[str, str]:
    """(reasoning, content) of a non-streamed choice, "" for null."""
    return getattr(choice.message, "reasoning_content", None) or "", choice.message.content or ""


# ---------------------------------------------------------------- n, seeds, stop strings


def test_n3_gives_indices_0_to_2_each_like_its_own_seed(client):
    full = chat(client, n=3, seed=11)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in full.choices)
    assert full.usage.completion_tokens == 3 * 12
    assert len({text_of(c) for c in full.choices}) == 3  # seeded samples differ
    # Sample i is seeded with seed + i, so it equals an n=1 request with that seed.
    assert text_of(chat(client, seed=12).choices[0]) == text_of(full.choices[1])

    streamed = chat(client, stream=True, n=3, seed=11)
    assert sorted(streamed["choices"]) == [0, 1, 2]
    for i, state in streamed["choices"].items():
        assert (state["reasoning"], state["content"]) == text_of(full.choices[i])
        assert state["finish"] == ["length"]


def test_seed_gives_the_same_tokens_twice(client):
    first = chat(client, seed=7, logprobs=True, max_tokens=16)
    again = chat(client, seed=7, logprobs=True, max_tokens=16)
    tokens = [e.bytes for e in first.choices[0].logprobs.content]
    assert len(tokens) == 16 and [e.bytes for e in again.choices[0].logprobs.content] == tokens
    assert text_of(first.choices[0]) == text_of(again.choices[0])
    streamed = chat(client, stream=True, seed=7, logprobs=True, max_tokens=16)["choices"][0]
    assert [e.bytes for e in streamed["logprobs"]] == tokens
    other = chat(client, seed=8, logprobs=True, max_tokens=16)
    assert [e.bytes for e in other.choices[0].logprobs.content] != tokens


def _tokens(answer) -> list[list[int]]:
    return [e.bytes for e in answer.choices[0].logprobs.content]


@pytest.mark.parametrize(("extra", "temperature"), [(None, 1.0), (INSTANT, 0.6)])
def test_unset_sampling_fields_get_the_model_card_defaults(client, extra, temperature):
    """Thinking mode samples at temperature 1.0, instant mode at 0.6, both with top_p 0.95."""
    kwargs = {"seed": 31, "logprobs": True, "max_tokens": 16, "extra_body": extra}
    defaults = _tokens(chat(client, **kwargs))
    assert _tokens(chat(client, temperature=temperature, top_p=0.95, **kwargs)) == defaults
    assert _tokens(chat(client, temperature=temperature, top_p=1.0, **kwargs)) != defaults


def _stop_candidate(content: str) -> str:
    """A two-character ASCII stop string that occurs in `content` after its start."""
    for i in range(3, len(content) - 1):
        piece = content[i : i + 2]
        if piece.isascii() and piece.isalnum():
            return piece
    raise AssertionError(f"no stop candidate in {content!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_never_appears_in_content(client, stream):
    base = chat(client, seed=3, max_tokens=32, extra_body=INSTANT)
    content = base.choices[0].message.content
    stop = _stop_candidate(content)
    expected = content[: content.index(stop)]
    answer = chat(
        client, stream, seed=3, max_tokens=32, stop=["@@never@@", stop], extra_body=INSTANT
    )
    if stream:
        state = answer["choices"][0]
        assert (state["content"], state["finish"]) == (expected, ["stop"])
        assert answer["usage"].completion_tokens < 32
    else:
        choice = answer.choices[0]
        assert (choice.message.content or "", choice.finish_reason) == (expected, "stop")
        assert stop not in (choice.message.content or "")
        assert answer.usage.completion_tokens < 32  # generation ended at the match


# ---------------------------------------------------------------- logprobs


def _check_positions(entries, num_top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0 and entry.token == bytes(entry.bytes).decode(errors="replace")
        alternatives = entry.top_logprobs
        assert len(alternatives) == num_top
        values = [a.logprob for a in alternatives]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # The sampled token and the distinct alternatives are disjoint events: mass <= 1.
        mass = sum(math.exp(v) for v in values)
        if entry.bytes not in [a.bytes for a in alternatives]:
            mass += math.exp(entry.logprob)
        assert mass <= 1 + 1e-4


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_log_probabilities(client, stream):
    answer = chat(client, stream, seed=5, logprobs=True, top_logprobs=5, max_tokens=10)
    if stream:
        entries, num_tokens = answer["choices"][0]["logprobs"], answer["usage"].completion_tokens
    else:
        entries, num_tokens = answer.choices[0].logprobs.content, answer.usage.completion_tokens
    assert len(entries) == num_tokens == 10
    _check_positions(entries, 5)


def test_greedy_picks_the_top_alternative(client):
    answer = chat(client, temperature=0, logprobs=True, top_logprobs=2, max_tokens=8)
    for entry in answer.choices[0].logprobs.content:
        best = entry.top_logprobs[0]
        assert (best.bytes, best.logprob) == (entry.bytes, entry.logprob)
    plain = chat(client, temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None and text_of(plain.choices[0]) == text_of(
        answer.choices[0]
    )


def test_text_completion_logprobs_legacy_shape(client):
    answer = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=6, logprobs=3, seed=2
    )
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


# ---------------------------------------------------------------- limits, finish reasons, usage


LIMITS = [{"max_completion_tokens": 5}, {"max_tokens": 5}]
LIMITS += [{"max_tokens": 100, "max_completion_tokens": 5}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("limits", LIMITS)
def test_k42_completion_limit_and_length(client, stream, limits):
    chat(client, max_tokens=1)  # the same prompt ran before, so its full pages are cached
    answer = chat(client, stream, seed=1, **limits)
    if stream:
        usage, finish = answer["usage"], answer["choices"][0]["finish"]
    else:
        usage, finish = answer.usage, [answer.choices[0].finish_reason]
    assert usage.completion_tokens == 5 and finish == ["length"]
    assert usage.completion_tokens_details.reasoning_tokens == 5  # thinking on: all reasoning
    assert usage.total_tokens == usage.prompt_tokens + 5
    # the prefill worker's prefix cache held all full pages of the prompt but the last token's
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 == 32


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_length_error_names_the_field_sent(client, param):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, **{param: CONTEXT_LENGTH})
    error = raised.value.body
    assert error["param"] == param and f"`{param}`" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_instant_mode_has_no_reasoning(client):
    answer = chat(client, seed=1, extra_body=INSTANT)
    assert answer.choices[0].message.reasoning_content is None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


# ---------------------------------------------------------------- tool_choice


def test_named_tool_choice_opens_the_call(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    kwargs = {"tools": [WEATHER, TIME], "tool_choice": named, "seed": 4}
    streamed = chat(client, stream=True, **kwargs)
    state = streamed["choices"][0]
    assert state["calls"][0]["id"] == "functions.get_time:0"
    assert state["calls"][0]["name"] == "get_time" and list(state["calls"]) == [0]
    assert state["reasoning"] == "" and state["content"] == ""
    assert streamed["usage"].completion_tokens_details.reasoning_tokens == 0
    # Random weights never close the call: it is cut by max_tokens, so (K04) the
    # non-streaming answer has no complete call and says "length".
    choice = chat(client, **kwargs).choices[0]
    assert (choice.finish_reason, choice.message.tool_calls) == ("length", None)
    assert choice.message.reasoning_content is None and choice.message.content is None


def test_required_tool_choice_skips_reasoning(client):
    answer = chat(client, tools=[WEATHER], tool_choice="required", seed=4)
    assert answer.choices[0].message.reasoning_content is None
    assert "<|" not in (answer.choices[0].message.content or "")
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_choice_errors_are_400(client):
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        chat(client, tool_choice="required")
    missing = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match="nope"):
        chat(client, tools=[WEATHER], tool_choice=missing)


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_tools_with_auto_none_and_parallel_off_are_accepted(client, choice):
    answer = chat(client, tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False, seed=2)
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert len(answer.choices[0].message.tool_calls or []) <= 1


# ---------------------------------------------------------------- async client


def test_async_client_streams_and_answers_alike(stack):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0
        ) as aclient:
            kwargs = {"model": MODEL, "messages": HI, "max_completion_tokens": 8, "seed": 9}
            kwargs |= {"logprobs": True, "n": 2}
            full, stream = await asyncio.gather(
                aclient.chat.completions.create(**kwargs),
                aclient.chat.completions.create(**kwargs, stream=True),
            )
            return full, [chunk async for chunk in stream]

    full, chunks = asyncio.run(main())
    states = {}
    for choice in (c for chunk in chunks for c in chunk.choices):
        state = states.setdefault(choice.index, {"reasoning": "", "logprobs": []})
        state["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
        state["logprobs"] += choice.logprobs.content if choice.logprobs else []
    for choice in full.choices:
        assert states[choice.index]["reasoning"] == choice.message.reasoning_content
        streamed, answered = states[choice.index]["logprobs"], choice.logprobs.content
        assert [e.bytes for e in streamed] == [e.bytes for e in answered]
        # Both ran in one decode batch: the values agree to float rounding, not bit for bit.
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in answered])


def test_detokenize_round_trip_and_bad_ids(stack):
    text = "<|im_user|>user<|im_middle|>Grüße, 世界!<|im_end|>"
    tokens = httpx.post(f"{stack.base_url}/tokenize", json={"prompt": text}).json()["tokens"]
    back = httpx.post(f"{stack.base_url}/detokenize", json={"model": MODEL, "tokens": tokens})
    assert back.json() == {"prompt": text}
    bad = httpx.post(f"{stack.base_url}/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenize_stops_at_the_context_length(stack):
    """A 3 MB prompt is refused once its ids reach the context length, not tokenized whole."""
    answer = httpx.post(f"{stack.base_url}/tokenize", json={"prompt": "hello " * 500_000},
                        timeout=30)  # fmt: skip
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt"
    assert "maximum context length is" in error["message"]
    ok = httpx.post(f"{stack.base_url}/tokenize", json={"prompt": "hello"}).json()
    assert ok["count"] == len(ok["tokens"]) > 0
