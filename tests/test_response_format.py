"""`response_format` through the whole stack (gateway -> router -> prefill -> decode), with the real
openai client, sync and async, streamed and not: JSON that parses, and validates against its schema,
from the tiny checkpoint's random weights. Schemas bound every string, number and choice, so a
sample ends within `max_tokens`; seeds are fixed, so each case is one exact generation."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import jsonschema
import openai
import pytest
from stack_utils import start_stack

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc

MODEL = "moonshotai/Kimi-K2.5"
INSTANT = {"chat_template_kwargs": {"thinking": False}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def _collect(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, str, str]:
    """(reasoning, content, finish_reason) of one chat completion."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
        return reasoning, choice.message.content or "", choice.finish_reason
    reasoning, content, finish = [], [], ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), finish


def _assert_pages_back(stack, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        statuses = []
        for name, stub in (("decode-0", pb_grpc.DecodeWorkerStub),
                           ("prefill-0", pb_grpc.PrefillWorkerStub)):  # fmt: skip
            with grpc.insecure_channel(f"127.0.0.1:{stack.child(name).port}") as channel:
                statuses.append(stub(channel).Status(pb.StatusRequest(), timeout=5))
        if all(s.num_free_pages == s.num_total_pages for s in statuses):
            return
        assert time.monotonic() < deadline, [(s.worker_id, s.num_free_pages) for s in statuses]
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 1), (1.0, 2), (0.6, 3)])
def test_json_schema_output_validates(client, stream, temperature, seed):
    _, content, finish = _collect(client, stream, response_format=PERSON_FORMAT,
                                  temperature=temperature, seed=seed,
                                  extra_body=INSTANT)  # fmt: skip
    assert finish == "stop", content
    jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("stream", [False, True])
# json_object bounds nothing: these seeds close their object within the limit (others write one
# string for more than 400 tokens).
@pytest.mark.parametrize("seed", [6, 11])
def test_json_object_output_is_a_json_object(client, stream, seed):
    _, content, finish = _collect(client, stream, response_format={"type": "json_object"},
                                  temperature=1.0, seed=seed, extra_body=INSTANT)  # fmt: skip
    assert finish == "stop", content
    assert isinstance(json.loads(content), dict)


def test_same_seed_gives_the_same_json_streamed_or_not(client):
    kwargs = {"response_format": PERSON_FORMAT, "temperature": 1.0, "seed": 5}
    assert _collect(client, False, extra_body=INSTANT, **kwargs) == _collect(
        client, True, extra_body=INSTANT, **kwargs
    )


def test_n_samples_each_follow_the_schema(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=400, n=3, temperature=1.0, seed=11,
        response_format=PERSON_FORMAT, extra_body=INSTANT,
    )  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1, 2]
    values = [json.loads(c.message.content) for c in response.choices]
    for value in values:
        jsonschema.validate(value, PERSON)
    assert len({json.dumps(v) for v in values}) > 1  # three samples, not one thrice


def test_text_completions_take_response_format_too(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = client.completions.create(
        model=MODEL, prompt="The answer as JSON:", max_tokens=200, temperature=1.0, seed=4,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "answer", "schema": schema}}},
    )  # fmt: skip
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].text), schema)


def test_reasoning_is_free_text_and_only_the_answer_is_constrained(client):
    """Thinking on (the default): the grammar starts after `</think>`, so the greedy reasoning is
    exactly the unconstrained one; an answer after it, if the random model closes its reasoning
    within the limit, follows the schema. (That the constraint starts right after `</think>` is
    shown with forced logits in tests/test_grammar.py.)"""
    free = _collect(client, False, temperature=0.0, max_tokens=120)
    constrained = _collect(client, False, temperature=0.0, max_tokens=120,
                           response_format=PERSON_FORMAT)  # fmt: skip
    assert constrained[0] and constrained[0] == free[0]
    if constrained[1]:
        jsonschema.validate(json.loads(constrained[1]), PERSON)
    streamed = _collect(client, True, temperature=0.0, max_tokens=120,
                        response_format=PERSON_FORMAT)  # fmt: skip
    assert streamed == constrained


def test_async_clients_mix_constrained_and_free_requests(stack, client):
    """Concurrent requests share decode batches: the unconstrained greedy one gives the tokens
    it gives alone, and each constrained one its own valid JSON."""
    alone = _collect(client, False, temperature=0.0, max_tokens=40, extra_body=INSTANT)

    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="x",
                                     max_retries=0, timeout=120)  # fmt: skip

        async def streamed(seed: int) -> str:
            chunks = await aclient.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=400, temperature=1.0, seed=seed,
                response_format=PERSON_FORMAT, extra_body=INSTANT, stream=True,
            )  # fmt: skip
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        free = aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                               temperature=0.0, extra_body=INSTANT)  # fmt: skip
        whole = aclient.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=400, temperature=1.0, seed=6,
            response_format={"type": "json_object"}, extra_body=INSTANT,
        )  # fmt: skip
        try:
            return await asyncio.gather(free, whole, streamed(1), streamed(3))
        finally:
            await aclient.close()

    free, whole, first, second = asyncio.run(run())
    assert free.choices[0].message.content == alone[1]
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    for content in (first, second):
        jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "wizard"}, 'Unsupported type "wizard"'),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}, "nowhere"),
        ({"type": "string", "pattern": "[a-"}, "Regex parsing error"),
    ],
)
def test_invalid_schema_is_400_naming_response_format(stack, client, schema, reason):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                       response_format=bad)  # fmt: skip
    body = error.value.body
    assert body["param"] == "response_format" and body["type"] == "invalid_request_error"
    assert body["message"].startswith("response_format.json_schema.schema cannot be enforced")
    assert reason in body["message"]
    _, content, finish = _collect(client, False, response_format=PERSON_FORMAT, temperature=1.0,
                                  seed=1, extra_body=INSTANT)  # fmt: skip
    assert finish == "stop"  # still serving, constrained requests included
    jsonschema.validate(json.loads(content), PERSON)


def test_colocated_worker_enforces_the_schema(tiny_checkpoint):
    """`kimiserve up --colocated`: one process prefills (first token) and decodes under the same
    grammar cache; the JSON validates and every page comes back."""
    colocated = start_stack(tiny_checkpoint, colocated=True)
    try:
        client = openai.OpenAI(base_url=f"{colocated.base_url}/v1", api_key="x", max_retries=0,
                               timeout=120)  # fmt: skip
        for stream, seed in ((False, 1), (True, 2)):
            _, content, finish = _collect(client, stream, response_format=PERSON_FORMAT,
                                          temperature=1.0, seed=seed,
                                          extra_body=INSTANT)  # fmt: skip
            assert finish == "stop", content
            jsonschema.validate(json.loads(content), PERSON)
        deadline = time.monotonic() + 5
        while True:
            with grpc.insecure_channel(colocated.child("decode-0").address) as channel:
                status = pb_grpc.DecodeWorkerStub(channel).Status(pb.StatusRequest(), timeout=5)
            if status.num_free_pages == status.num_total_pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status.num_free_pages == status.num_total_pages
    finally:
        colocated.stop()


def test_pages_come_back_after_constrained_requests(stack):
    """Runs after the tests above in this module: every page of both workers is free again."""
    _assert_pages_back(stack)
