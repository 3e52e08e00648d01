"""The HTTP gateway against a scripted router on 127.0.0.1.

A real gRPC server runs `ScriptedRouter`, which answers `Router.Generate` with canned chunks and
records what it received; the real gateway runs under uvicorn in a thread. Clients are the real
`openai` package (sync and async) and httpx for raw bodies, headers and SSE framing. The scripted
router stands in for the router only here: these tests cover the gateway's translation and
framing, not parsing or scheduling.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent import futures

import grpc
import httpx
import openai
import pytest
import uvicorn

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from router.gateway import create_app
from router.gateway_http import DEFAULT_HEAD_TIMEOUT_S, server_config

MODEL = "moonshotai/Kimi-K2.5"
API_KEY = "sk-test-key"
BODY_LIMIT = 4096
CHAT = "/v1/chat/completions"
USAGE = pb.Usage(prompt_tokens=20, completion_tokens=12, reasoning_tokens=4, cached_tokens=8)
USAGE_JSON = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
USAGE_JSON |= {"completion_tokens_details": {"reasoning_tokens": 4}}
USAGE_JSON |= {"prompt_tokens_details": {"cached_tokens": 8}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
HELLO = [{"role": "user", "content": "hi"}]
CALL_ID = "functions.get_weather:0"


def delta(index=0, content="", reasoning="", calls=(), finish=""):
    tool_calls = [pb.ToolCallDelta(index=i, id=id_, name=n, arguments=a) for i, id_, n, a in calls]
    out = pb.ChoiceDelta(index=index, content=content, reasoning_content=reasoning)
    out.tool_calls.extend(tool_calls)
    out.finish_reason = finish
    return out


def chunk(*deltas, usage=None):
    return pb.GenerateChunk(choices=deltas, usage=usage)


def error_chunk(status, message, param="", code=""):
    error = pb.Error(http_status=status, type="invalid_request_error", message=message)
    error.param, error.code = param, code
    return pb.GenerateChunk(error=error)


# Reasoning, then content, then two tool calls whose arguments arrive in pieces.
TOOL_SCRIPT = [
    chunk(delta(reasoning="Need the ")),
    chunk(delta(reasoning="weather.")),
    chunk(delta(content="Checking. ")),
    chunk(delta(calls=[(0, CALL_ID, "get_weather", '{"city": ')])),
    chunk(delta(calls=[(0, "", "", '"Oslo"}')])),
    chunk(delta(calls=[(1, "functions.get_time:1", "get_time", "{}")])),
    chunk(delta(finish="stop"), usage=USAGE),
]
EXPECTED_CALLS = [
    (CALL_ID, "get_weather", '{"city": "Oslo"}'),
    ("functions.get_time:1", "get_time", "{}"),
]
# n=2: interleaved choices; choice 1 calls a tool (its call index starts at 0), choice 0 answers.
TWO_CHOICE_SCRIPT = [
    chunk(delta(0, reasoning="A thinks."), delta(1, reasoning="B thinks.")),
    chunk(delta(1, calls=[(0, CALL_ID, "get_weather", "{}")])),
    chunk(delta(0, content="A answers.")),
    chunk(delta(1, finish="stop"), delta(0, finish="stop"), usage=USAGE),
]


class ScriptedRouter(pb_grpc.RouterServicer):
    """Replays `script` for every Generate call and records the requests."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.script = [chunk(delta(content="Hello!")), chunk(delta(finish="stop"), usage=USAGE)]
        self.delay_s = 0.0
        self.ready = True
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        self.requests.append(request)
        finished = threading.Event()
        # Runs when the RPC ends; a cancelled RPC may never resume this generator.
        context.add_callback(lambda: finished.is_set() or self.cancelled.set())
        for item in self.script:
            time.sleep(self.delay_s)
            if not context.is_active():
                return
            yield item
        finished.set()

    def Health(self, request, context):
        return pb.HealthResponse(ready=self.ready, model_name=MODEL)


class GatewayThread:
    """Serves an app with uvicorn on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app, head_timeout: float = DEFAULT_HEAD_TIMEOUT_S) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(app, log_level="warning", head_timeout=head_timeout)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._socket.close()


@pytest.fixture(scope="module")
def router():
    servicer = ScriptedRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


@pytest.fixture(autouse=True)
def fresh_router(request):
    if "router" in request.fixturenames:
        request.getfixturevalue("router").reset()


@pytest.fixture(scope="module")
def gateway(router):
    with GatewayThread(create_app(router.address, MODEL)) as served:
        yield served.url


@pytest.fixture(scope="module")
def secured(router):
    app = create_app(router.address, MODEL, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    with GatewayThread(app) as served:
        yield served.url


@pytest.fixture(scope="module")
def orphan():
    """A gateway whose router address has nobody listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with GatewayThread(create_app(address, MODEL)) as served:
        yield served.url


def chat_body(**fields):
    return {"model": MODEL, "messages": HELLO, **fields}


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def post(url, body, path=CHAT, **kwargs):
    return httpx.post(url + path, json=body, **{"timeout": 30, **kwargs})


def sse_payloads(url, body, path=CHAT):
    """The `data:` payloads of a streamed answer, `[DONE]` kept as a string."""
    with httpx.stream("POST", url + path, json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [p if p == "[DONE]" else json.loads(p) for p in (line[6:] for line in lines)]


def merge_stream(chunks):
    """Accumulates openai stream chunks per choice: reasoning, content, tool calls, finish."""
    out = {}
    for choice in (choice for item in chunks for choice in item.choices):
        state = out.setdefault(choice.index, {"reasoning": "", "content": "", "calls": {}})
        state["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
        state["content"] += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            slot = state["calls"].setdefault(call.index, ["", "", ""])
            slot[0] += call.id or ""
            slot[1] += call.function.name or ""
            slot[2] += call.function.arguments or ""
        state["finish"] = choice.finish_reason or state.get("finish")
    return out


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
    return error


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


# ---------------------------------------------------------------- errors


def user(content):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": user(5)}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": user([{"type": "audio"}])}, "messages[0].content[0]"),
        ({"messages": user([{"type": "image_url"}])}, "messages[0].content[0]"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "response_format",
        ),
    ],
)
def test_invalid_chat_requests_are_400_naming_the_field(router, gateway, fields, param):
    error = assert_openai_error(post(gateway, chat_body(**fields)), 400, param)
    assert error["type"] == "invalid_request_error"
    assert router.requests == []


LONE_SURROGATE = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
# Valid JSON nested deeper than the gateway's limit (the router's renderer would recurse).
DEEP = json.loads("[" * 300 + "]" * 300)
DEEP_TOOLS = json.dumps(
    chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"x": DEEP}}}])
).encode()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"messages": NaN}', b"\xff\xfe", b"[" * 100_000, LONE_SURROGATE,
     DEEP_TOOLS],
)  # fmt: skip
def test_malformed_bodies_are_400(router, gateway, content):
    response = httpx.post(gateway + CHAT, content=content, timeout=30)
    assert_openai_error(response, 400)
    assert router.requests == []


def _answer_then_close(port: int, sent: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        answer = b""
        while piece := sock.recv(4096):  # until the gateway closes the connection
            answer += piece
    return answer


def test_slow_head_and_slow_body_get_408_and_the_connection_closes(router):
    app = create_app(router.address, MODEL, body_timeout=0.5)
    partial = b"POST /v1/chat/completions HTTP/1.1\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with GatewayThread(app, head_timeout=0.5) as served:
        partial_head = _answer_then_close(served.port, partial)
        partial_body = _answer_then_close(served.port, head + b"{")
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            health = b""
            while not health.endswith(b'{"status":"ok"}'):
                health += sock.recv(4096)
            assert health.startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle on a kept-alive connection: no deadline yet
            sock.sendall(partial)  # a head begins: now it has 0.5 s
            kept_alive = b""
            while piece := sock.recv(4096):
                kept_alive += piece
    for answer in (partial_head, partial_body, kept_alive):
        assert answer.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout"
    assert router.requests == []


def test_malformed_http_is_an_openai_400(gateway):
    port = int(gateway.rsplit(":", 1)[1])
    answer = _answer_then_close(port, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_completions_reject_batches(gateway):
    body = {"model": MODEL, "prompt": ["one", "two"]}
    assert_openai_error(post(gateway, body, "/v1/completions"), 400, "prompt")


def test_unknown_model_is_404(router, gateway):
    error = assert_openai_error(post(gateway, chat_body(model="gpt-4o")), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="gpt-4o", messages=HELLO)


def test_api_key_is_required_except_on_health(router, secured):
    for path in ("/v1/models", "/health/ready"):
        assert_openai_error(httpx.get(secured + path), 401)
    wrong = post(secured, chat_body(), headers={"Authorization": "Bearer nope"})
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(secured + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(secured, "sk-wrong").models.list()
    answer = client(secured, API_KEY).chat.completions.create(model=MODEL, messages=HELLO)
    assert answer.choices[0].message.content == "Hello!"
    assert router.requests


def test_body_over_limit_is_413(router, secured):
    body = chat_body(messages=user("x" * BODY_LIMIT))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert_openai_error(post(secured, body, headers=auth), 413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(body).encode()

    response = httpx.post(secured + CHAT, content=chunked(), headers=auth)
    assert_openai_error(response, 413)
    assert router.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_router_error_status_passes_through(router, gateway, stream):
    too_long = error_chunk(400, "prompt is too long", "messages", "context_length_exceeded")
    router.script = [too_long]
    body = chat_body(stream=stream)
    error = assert_openai_error(post(gateway, body), 400)
    assert (error["message"], error["param"]) == ("prompt is too long", "messages")
    assert error["code"] == "context_length_exceeded"

    router.script = [error_chunk(503, "no decode worker is available")]
    busy = post(gateway, body)
    assert_openai_error(busy, 503)
    assert busy.headers["retry-after"] == "1"
    router.script[0].error.retry_after_seconds = 7  # the router's hint wins
    assert post(gateway, body).headers["retry-after"] == "7"


def test_unreachable_router_is_503_with_retry_after(orphan):
    for response in (post(orphan, chat_body()), httpx.get(orphan + "/health/ready")):
        assert_openai_error(response, 503)
        assert response.headers["retry-after"] == "1"
    with pytest.raises(openai.APIStatusError) as raised:
        client(orphan).chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert raised.value.status_code == 503
    assert httpx.get(orphan + "/health").status_code == 200


def test_error_after_stream_started_ends_with_error_event(router, gateway):
    router.script = [chunk(delta(content="Hel")), error_chunk(500, "decode worker lost")]
    payloads = sse_payloads(gateway, chat_body(stream=True))
    assert payloads[-2]["error"]["message"] == "decode worker lost" and payloads[-1] == "[DONE]"
    router.script = [chunk(delta(content="Hel")), error_chunk(500, "decode worker lost")]
    with pytest.raises(openai.APIError, match="decode worker lost"):
        list(client(gateway).chat.completions.create(model=MODEL, messages=HELLO, stream=True))


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_router_call(router, gateway, stream):
    router.script = [chunk(delta(content="tok")) for _ in range(400)]
    router.delay_s = 0.05
    body = chat_body(stream=stream)
    if stream:
        with httpx.stream("POST", gateway + CHAT, json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway + CHAT, json=body, timeout=0.5)
    assert router.cancelled.wait(timeout=5), "the router call was not cancelled"
