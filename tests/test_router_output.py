"""The router's output path with scripted token ids: prompt building (`router.prompt`),
per-choice processing (`router.postprocess`) and the gateway's assembly (`router.responses`),
streaming and not. Parser cases whose markers random weights cannot produce over HTTP (K01,
K04, K16, K18, K21, K39) run here, as do `tool_choice`, `parallel_tool_calls` and logprobs."""

from __future__ import annotations

import json

import pytest

from proto import kimiserve_pb2 as pb
from router.postprocess import ChoiceOutput
from router.prompt import InvalidRequest, PromptBuilder
from router.responses import ChatStreamWriter, Collector
from router.sampling import SamplingDefaults, for_sample, resolve_sampling

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
END = "<|im_end|>"


def tool(name: str) -> dict:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def call(call_id: str, args: str) -> str:
    return f"{CB}{call_id}{AB}{args}{CE}"


@pytest.fixture(scope="module")
def builder(tiny_tokenizer, tiny_tokenizer_dir):
    return PromptBuilder(tiny_tokenizer_dir, tiny_tokenizer)


def request(
    thinking=True,
    tools=(),
    tool_choice=None,
    parallel=None,
    stop=(),
    messages=None,
    logprobs=-1,
    include_stop=False,
) -> pb.GenerateRequest:
    """A chat request as the gateway sends it (sampling as the router resolves it)."""
    out = pb.GenerateRequest(request_id="r", n=1, stop=list(stop), skip_special_tokens=True)
    out.messages.extend(messages or [pb.ChatMessage(role="user", content="hi")])
    out.tools_json = json.dumps(list(tools)) if tools else ""
    out.tool_choice_json = json.dumps(tool_choice) if tool_choice is not None else ""
    out.chat_template_kwargs_json = json.dumps({"thinking": thinking})
    out.include_stop_str_in_output = include_stop
    if parallel is not None:
        out.parallel_tool_calls = parallel
    out.sampling.logprobs = logprobs >= 0
    out.sampling.top_logprobs = max(logprobs, 0)
    return out


class Run:
    """One choice driven like `RouterServicer._stream_choice`, assembled like the gateway."""

    def __init__(self, builder, markers, wire: pb.GenerateRequest, raw: str, finish: str) -> None:
        tok = builder.tokenizer
        self.prompt = builder.build(wire)
        wire.sampling.stop_token_ids.extend(tok.eos_token_ids)
        self.out = ChoiceOutput(0, tok, markers, self.prompt, wire)
        self.ids = tok.encode(raw)
        self.deltas = [d for d in [self.out.start()] if d is not None]
        self.num_fed = 0
        for token_id in self.ids:
            top = [pb.TokenLogprob(token_id=token_id, logprob=-0.25), pb.TokenLogprob(logprob=-3)]
            delta = self.out.on_token(
                pb.TokenOutput(token_id=token_id, logprob=-0.25, top_logprobs=top)
            )
            self.num_fed += 1
            if self.out.finished:
                delta = self.out.finish(delta, "")
            self.deltas.append(delta)
            if self.out.finished:
                break
        if not self.out.finished:
            self.deltas.append(self.out.finish(None, finish))
        logprobs = wire.sampling.logprobs
        collector = Collector(1, logprobs)
        writer = ChatStreamWriter("id", 0, "m", include_usage=False, logprobs=logprobs)
        events = writer.start(1)
        for delta in self.deltas:
            chunk = pb.GenerateChunk(choices=[delta])
            collector.add(chunk)
            events += writer.events(chunk)
        events += writer.finish()
        self.choice = collector.chat_completion("id", 0, "m")["choices"][0]
        self.message = self.choice["message"]
        self.events = [json.loads(e[6:]) for e in events[:-1]]  # without [DONE]
        self.stream = [e["choices"][0] for e in self.events]

    def streamed(self, key: str) -> str:
        return "".join(c["delta"].get(key) or "" for c in self.stream)

    def streamed_calls(self) -> dict[int, dict]:
        calls: dict[int, dict] = {}
        for piece in (p for c in self.stream for p in c["delta"].get("tool_calls", [])):
            slot = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += piece.get("id", "")
            slot["name"] += piece["function"].get("name", "")
            slot["arguments"] += piece["function"]["arguments"]
        return calls

    @property
    def calls(self) -> list[tuple[str, str, str]]:
        calls = self.message.get("tool_calls") or []
        return [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]

    @property
    def stream_finish(self) -> str:
        return self.stream[-1]["finish_reason"]


@pytest.fixture
def run(builder, tiny_tokenizer):
    from shared.parsers import MarkerTable

    markers = MarkerTable.from_tokenizer(tiny_tokenizer)
    return lambda wire, raw, finish="stop": Run(builder, markers, wire, raw, finish)


def assert_stream_agrees(result: Run) -> None:
    """Streaming shows what non-streaming returns (complete calls only)."""
    assert result.streamed("reasoning_content") == (result.message["reasoning_content"] or "")
    assert result.streamed("content") == (result.message["content"] or "")
    streamed = result.streamed_calls()
    for call_id, name, arguments in result.calls:
        assert {"id": call_id, "name": name, "arguments": arguments} in streamed.values()
    assert result.stream_finish == result.choice["finish_reason"]


# ---------------------------------------------------------------- parser cases of cases.md


def test_k01_back_to_back_tool_calls(run):
    raw = (
        f"Checking both. {SB}"
        + call("functions.get_weather:0", '{"lat": 48.85, "lon": 2.35}')
        + call("functions.get_news:1", '{"topic": "Paris transit"}')
        + SE
        + END
    )
    result = run(request(False, [tool("get_weather"), tool("get_news")]), raw)
    assert result.message["content"] == "Checking both. "
    assert result.calls == [
        ("functions.get_weather:0", "get_weather", '{"lat": 48.85, "lon": 2.35}'),
        ("functions.get_news:1", "get_news", '{"topic": "Paris transit"}'),
    ]
    assert result.choice["finish_reason"] == "tool_calls"
    assert_stream_agrees(result)


def test_k04_truncated_call_is_left_out_of_the_answer(run):
    raw = (
        SB
        + call("functions.get_weather:0", '{"city": "Lyon"}')
        + f'{CB}functions.get_time:1{AB}{{"tz": "Eur'
    )
    result = run(request(False, [tool("get_weather"), tool("get_time")]), raw, "length")
    assert result.calls == [("functions.get_weather:0", "get_weather", '{"city": "Lyon"}')]
    assert result.message["content"] is None and result.choice["finish_reason"] == "length"
    # DECISION K04: streaming clients saw the partial call; the finish reason says it is cut.
    assert result.streamed_calls()[1] == {
        "id": "functions.get_time:1",
        "name": "get_time",
        "arguments": '{"tz": "Eur',
    }
    assert result.stream_finish == "length"
    assert result.deltas[-1].unfinished_tool_calls == [1]


def test_call_cut_by_end_of_turn_is_not_a_tool_call_finish(run):
    named = {"type": "function", "function": {"name": "get_weather"}}
    result = run(request(False, [tool("get_weather")], named), '{"city": "Os' + END)
    assert result.calls == [] and result.choice["finish_reason"] == "stop"
    assert result.stream_finish == "stop" and result.streamed_calls()[0]["name"] == "get_weather"


def test_k16_tool_section_inside_reasoning_ends_it(run):
    raw = "Need the file first." + SB + call("functions.read_file:0", '{"path": "/app/main.py"}')
    result = run(request(True, [tool("read_file")]), raw + SE + END)
    assert result.message["reasoning_content"] == "Need the file first."
    assert result.message["content"] is None
    assert result.calls == [("functions.read_file:0", "read_file", '{"path": "/app/main.py"}')]
    assert result.choice["finish_reason"] == "tool_calls"
    reasoning = [
        c["delta"]["reasoning_content"] for c in result.stream if "reasoning_content" in c["delta"]
    ]
    assert reasoning and not any("<|" in r for r in reasoning)
    assert_stream_agrees(result)


def test_k18_instant_mode_answers_in_content_only(run):
    result = run(request(False), "Hello! What can I do for you?" + END)
    assert result.message["content"] == "Hello! What can I do for you?"
    assert result.message["reasoning_content"] is None
    assert result.choice["finish_reason"] == "stop"
    assert all("reasoning_content" not in c["delta"] for c in result.stream)
    assert_stream_agrees(result)


@pytest.mark.parametrize(("end", "finish"), [("", "length"), ("[EOS]", "stop")])
def test_k21_generation_ends_inside_reasoning(run, end, finish):
    result = run(request(True), "Count letters: s, t, r, a, w" + end, finish)
    assert result.message["reasoning_content"] == "Count letters: s, t, r, a, w"
    assert result.message["content"] is None and result.choice["finish_reason"] == finish
    assert result.out.num_reasoning_tokens == result.out.num_tokens  # all inside reasoning
    assert_stream_agrees(result)


def test_k39_stop_strings_skip_reasoning(run):
    raw = "Primes: 2, 3, 5, 7.</think>2, 3, 5, 7, 11" + END
    result = run(request(True, stop=["7"]), raw)
    assert result.message["reasoning_content"] == "Primes: 2, 3, 5, 7."
    assert result.message["content"] == "2, 3, 5, " and result.choice["finish_reason"] == "stop"
    assert result.num_fed < len(result.ids)  # generation ended at the match
    assert_stream_agrees(result)


def test_include_stop_str_in_output_keeps_the_stop_string(run):
    result = run(request(False, stop=["ten", "3"], include_stop=True), "1, 2, 3, ten" + END)
    assert result.message["content"] == "1, 2, 3" and result.choice["finish_reason"] == "stop"


# ---------------------------------------------------------------- tool_choice


def test_tool_choice_none_declares_tools_but_does_not_parse(run):
    raw = SB + call("functions.get_weather:0", "{}") + SE + END
    result = run(request(False, [tool("get_weather")], "none"), raw)
    assert result.prompt.text.startswith("<|im_system|>tool_declare<|im_middle|># Tools")
    assert result.message["content"] == raw.removesuffix(END)
    assert result.calls == [] and result.choice["finish_reason"] == "stop"


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_choice_required_forces_the_tool_section(run, thinking):
    raw = call("functions.get_weather:0", '{"city": "Oslo"}') + SE + END
    result = run(request(thinking, [tool("get_weather")], "required"), raw)
    # Thinking or not, reasoning is closed empty before the section (thinking: `</think>` added).
    assert result.prompt.text.endswith(f"<|im_assistant|>assistant<|im_middle|><think></think>{SB}")
    assert result.calls == [("functions.get_weather:0", "get_weather", '{"city": "Oslo"}')]
    assert result.message["reasoning_content"] is None and result.message["content"] is None
    assert result.choice["finish_reason"] == "tool_calls"
    assert_stream_agrees(result)


def test_tool_choice_named_opens_the_call_with_the_next_id(run):
    history = [
        pb.ChatMessage(role="user", content="Weather in Oslo?"),
        pb.ChatMessage(
            role="assistant",
            content="",
            tool_calls=[
                pb.ToolCall(id="functions.get_weather:0", name="get_weather", arguments="{}")
            ],
        ),
        pb.ChatMessage(role="tool", tool_call_id="functions.get_weather:0", content="sunny"),
    ]
    named = {"type": "function", "function": {"name": "get_time"}}
    wire = request(True, [tool("get_weather"), tool("get_time")], named, messages=history)
    result = run(wire, ' {"tz": "CET"} ' + CE + SE + END)
    assert result.prompt.text.endswith(f"<think></think>{SB}{CB}functions.get_time:1{AB}")
    # The forced call's id and name reach the client before the first generated token.
    first = result.stream[1]["delta"]["tool_calls"][0]
    assert first == {
        "index": 0,
        "id": "functions.get_time:1",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    assert result.calls == [("functions.get_time:1", "get_time", '{"tz": "CET"}')]
    assert result.choice["finish_reason"] == "tool_calls"
    assert_stream_agrees(result)


@pytest.mark.parametrize("choice", ["named", "parallel_off"])
def test_one_call_allowed_ends_the_choice_at_a_second_call(run, choice):
    tools = [tool("get_weather")]
    if choice == "named":
        wire = request(False, tools, {"type": "function", "function": {"name": "get_weather"}})
        raw = '{"city": "Oslo"}' + CE
    else:
        wire, raw = (
            request(False, tools, parallel=False),
            SB + call("functions.get_weather:0", "{}"),
        )
    raw += call("functions.get_weather:1", '{"city": "Rome"}') + SE + "more" + END
    result = run(wire, raw)
    assert [c[0] for c in result.calls] == ["functions.get_weather:0"]
    assert list(result.streamed_calls()) == [0]
    assert result.num_fed < len(result.ids) and result.choice["finish_reason"] == "tool_calls"


def test_k08_required_ids_follow_the_conversation_counter(run):
    history = [
        pb.ChatMessage(
            role="assistant",
            content="",
            tool_calls=[
                pb.ToolCall(id=f"functions.get_weather:{i}", name="get_weather") for i in range(5)
            ],
        )
    ]
    history.append(pb.ChatMessage(role="user", content="again"))
    raw = call("functions.get_weather:5", '{"city": "Graz"}')
    raw += call("functions.get_weather:6", '{"city": "Linz"}') + SE + END
    result = run(request(True, [tool("get_weather")], "required", messages=history), raw)
    assert [(c[0]) for c in result.calls] == ["functions.get_weather:5", "functions.get_weather:6"]
    assert sorted(result.streamed_calls()) == [0, 1]


# ---------------------------------------------------------------- logprobs and roles


def test_logprobs_one_entry_per_token_except_the_stop_token(run, tiny_tokenizer):
    result = run(request(False, logprobs=1), "Hello there" + END)
    content = result.choice["logprobs"]["content"]
    ids = result.ids[:-1]  # <|im_end|> ends the choice and has no entry
    assert [e["bytes"] for e in content] == [list(tiny_tokenizer.token_bytes(i)) for i in ids]
    assert "".join(e["token"] for e in content) == "Hello there"
    assert all(e["logprob"] == -0.25 and len(e["top_logprobs"]) == 1 for e in content)
    streamed = [e for c in result.stream if c["logprobs"] for e in c["logprobs"]["content"]]
    assert streamed == content
    assert run(request(False), "Hello" + END).choice["logprobs"] is None


def test_developer_role_renders_as_system(builder):
    wire = request(
        False,
        messages=[
            pb.ChatMessage(role="developer", content="Be brief."),
            pb.ChatMessage(role="user", content="Hi"),
        ],
    )
    assert builder.build(wire).text == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi"
        "<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>"
    )


# ---------------------------------------------------------------- sampling resolution


@pytest.mark.parametrize(("thinking", "temperature"), [(True, 1.0), (False, 0.6)])
def test_unset_sampling_fields_get_the_model_card_defaults(builder, thinking, temperature):
    wire = request(thinking)
    sampling = resolve_sampling(wire, builder.build(wire), SamplingDefaults(), 4096, (7, 8))
    assert sampling.temperature == pytest.approx(temperature)
    assert sampling.top_p == pytest.approx(0.95) and sampling.top_k == 0
    assert sampling.repetition_penalty == 1.0 and not sampling.HasField("seed")
    assert list(sampling.stop_token_ids) == [7, 8] and sampling.max_tokens > 0

    wire.sampling.temperature, wire.sampling.top_p = 0.0, 1.0  # explicit values are kept
    sampling = resolve_sampling(wire, builder.build(wire), SamplingDefaults(), 4096, (7, 8))
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)


def test_generation_config_overrides_the_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_k": 20}')
    defaults = SamplingDefaults.from_dir(tmp_path)
    assert (defaults.temperature, defaults.instant_temperature) == (0.7, 0.7)
    assert defaults.top_k == 20 and defaults.top_p == 0.95


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_length_error_names_the_field_the_client_sent(builder, param):
    wire = request(False)
    wire.sampling.max_tokens, wire.max_tokens_param = 10_000, param
    with pytest.raises(InvalidRequest, match=f"`{param}`") as raised:
        resolve_sampling(wire, builder.build(wire), SamplingDefaults(), 4096, ())
    assert raised.value.param == param and "maximum context length is 4096" in str(raised.value)


def test_seeded_samples_get_consecutive_seeds():
    sampling = pb.SamplingParams(seed=2**63 - 1)
    assert for_sample(sampling, 0) is sampling
    assert [for_sample(sampling, i).seed for i in (1, 2)] == [-(2**63), -(2**63) + 1]
    assert not for_sample(pb.SamplingParams(), 2).HasField("seed")


# ---------------------------------------------------------------- hostile prompts


def test_prompt_tokenizing_stops_at_the_context_length(tiny_tokenizer, tiny_tokenizer_dir):
    limited = PromptBuilder(tiny_tokenizer_dir, tiny_tokenizer, context_length=64)
    huge = pb.GenerateRequest(request_id="r", prompt="word " * 2_000_000)
    with pytest.raises(InvalidRequest, match="maximum context length is 64 tokens") as error:
        limited.build(huge)
    assert error.value.param == "prompt"
    # Below the limit the ids are the tokenizer's, long runs and 400k-character pieces included.
    text = "x" * 30_000 + " " * 30_000 + "yz " * 150_000
    unlimited = PromptBuilder(tiny_tokenizer_dir, tiny_tokenizer, context_length=10**7)
    assert unlimited.encode(text, "prompt") == tiny_tokenizer.encode(text)


def test_empty_text_prompt_is_refused_before_any_worker(builder):
    with pytest.raises(InvalidRequest, match="must not be empty"):
        builder.build(pb.GenerateRequest(request_id="r", prompt=""))


def test_too_deeply_nested_tools_are_an_invalid_request(builder):
    deep = "[" * 5000 + "]" * 5000
    nested = {"type": "object", "properties": {"x": json.loads("[" * 800 + "]" * 800)}}
    for tools_json in (
        deep,
        json.dumps([tool("f") | {"function": {"name": "f", "parameters": nested}}]),
    ):
        req = request(tools=())
        req.tools_json = tools_json
        with pytest.raises(InvalidRequest):
            builder.build(req)


def test_template_kwargs_cannot_replace_the_requests_own_fields(builder):
    for name in ("messages", "tools", "add_generation_prompt"):
        req = request()
        req.chat_template_kwargs_json = json.dumps({name: 1})
        with pytest.raises(InvalidRequest, match=f"may not set '{name}'") as error:
            builder.build(req)
        assert error.value.param == "chat_template_kwargs"
