"""The harness of the gateway tests: a scripted router on 127.0.0.1 and the real gateway.

A real gRPC server runs `ScriptedRouter`, which answers `Router.Generate` with canned chunks and
records what it received; the real gateway runs under uvicorn in a thread. Clients are the real
`openai` package (sync and async) and httpx for raw bodies, headers and SSE framing. The scripted
router stands in for the router only here: these tests cover the gateway's translation and
framing, not parsing or scheduling. The fixtures are in this folder's
`conftest.py`.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import uvicorn

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
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
