"""The whole request path on the tiny checkpoint: openai client -> gateway -> router -> prefill ->
KV transfer (gloo) -> decode, each a separate process."""

from __future__ import annotations

import subprocess

import grpc
import openai
import pytest
from stack_utils import curl_chat, router_address

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc

MODEL = "moonshotai/Kimi-K2.5"
PROMPTS = [
    "Explain mixture-of-experts in one sentence.",
    "Hi",
    "Write a haiku about the sea.",
    "What is 17 * 23?",
    "Translate 'good morning' into French.",
    "List three prime numbers.",
    "日本の首都はどこですか？",
    "Summarise: the quick brown fox jumps over the lazy dog. " * 8,
]


def _chat(client: openai.OpenAI, prompt: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],  # fmt: skip
        temperature=0,
        max_tokens=24,
        **kwargs,
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_streaming_equals_non_streaming(client, prompt):
    full = _chat(client, prompt)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == MODEL
    assert full.usage.completion_tokens == 24 or choice.finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    reasoning = getattr(choice.message, "reasoning_content", None) or ""
    assert reasoning + (choice.message.content or "")  # random weights, but never empty

    chunks = list(_chat(client, prompt, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed_reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_reasoning == reasoning
    assert streamed_content == (choice.message.content or "")
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_disaggregation_matches_single_process(stack, tiny_checkpoint):
    """Greedy tokens through gateway-free gRPC equal a one-process generation, token for token."""
    from shared.model.generate import greedy_generate
    from shared.model.loader import load_text_model
    from shared.tokenizer import KimiTokenizer

    tokenizer = KimiTokenizer.from_dir(tiny_checkpoint)
    model = load_text_model(tiny_checkpoint)
    channel = grpc.insecure_channel(router_address(stack))
    stub = pb_grpc.RouterStub(channel)
    for prompt in PROMPTS[:4]:
        prompt_ids = tokenizer.encode(prompt)
        request = pb.GenerateRequest(
            request_id=f"test-{hash(prompt)}",
            prompt_token_ids=prompt_ids,
            sampling=pb.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        )
        served = [t for chunk in stub.Generate(request) for c in chunk.choices for t in c.token_ids]
        assert served == greedy_generate(model, prompt_ids, 32)
    channel.close()


# The model card's "6. Model Usage" section (`simple_chat`, `chat_with_image`; the video example is
# for Moonshot's own API only): https://huggingface.co/moonshotai/Kimi-K2.5#6-model-usage, mirrored
# at https://github.com/WolframRavenwolf/Kimi-K2.5/blob/main/README.md. Its examples are Python
# openai calls; these are the JSON bodies that client sends for them (extra_body merged into the
# top level), sent with curl.
GUIDE_TEXT_THINKING = (
    '{"messages": [{"role": "system", "content": "You are Kimi, an AI assistant created by '
    'Moonshot AI."}, {"role": "user", "content": [{"type": "text", "text": "which one is bigger, '
    '9.11 or 9.9? think carefully."}]}], "model": "moonshotai/Kimi-K2.5", "max_tokens": 4096, '
    '"stream": false}'
)
# The Instant-mode call with the card's line "for vLLM/SGLang":
# extra_body={'chat_template_kwargs': {"thinking": False}}.
GUIDE_TEXT_INSTANT = GUIDE_TEXT_THINKING[:-1] + ', "chat_template_kwargs": {"thinking": false}}'


def test_deployment_guide_request(stack):
    """The card's `simple_chat` in Thinking mode (the default): reasoning in `reasoning_content`,
    the prompt ending in `<think>`."""
    data = curl_chat(stack.base_url, GUIDE_TEXT_THINKING)
    choice, usage = data["choices"][0], data["usage"]
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and usage["completion_tokens"] <= 4096
    assert choice["message"]["reasoning_content"]  # random weights, but thinking comes first
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    instant = curl_chat(stack.base_url, GUIDE_TEXT_INSTANT)
    assert usage["prompt_tokens"] == instant["usage"]["prompt_tokens"] - 1  # `<think>` only


def test_deployment_guide_instant_request(stack):
    """The card's `simple_chat` in Instant mode: the prompt closes the reasoning
    (`<think></think>`), so everything is `content` and no token counts as reasoning."""
    data = curl_chat(stack.base_url, GUIDE_TEXT_INSTANT)
    message, usage = data["choices"][0]["message"], data["usage"]
    assert message["role"] == "assistant" and message["content"]
    assert 0 < usage["completion_tokens"] <= 4096
    # The body samples (no temperature: the default), and random weights may open `<think>`
    # themselves, which the parser then reads as reasoning (docs/parsers.md). Greedy, this
    # checkpoint does not, and nothing may count as reasoning.
    greedy = curl_chat(stack.base_url, GUIDE_TEXT_INSTANT[:-1] + ', "temperature": 0}')
    message, usage = greedy["choices"][0]["message"], greedy["usage"]
    assert message["content"] and not message.get("reasoning_content")
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_each_role_is_its_own_process(stack):
    pids = {c.name: c.process.pid for c in stack.children}
    assert set(pids) == {"vision-0", "decode-0", "prefill-0", "router", "gateway"}
    assert len(set(pids.values())) == 5
    ps = subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, pids.values()))],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    for module in ("vision_worker.server", "decode_worker.server", "prefill_worker.server",
                   "router.server", "router.gateway_main"):  # fmt: skip
        assert module in ps


def test_metrics_after_load(stack):
    """Runs last in this module: the requests above are the load."""
    import re

    import httpx

    text = httpx.get(f"{stack.base_url}/metrics", timeout=10).text

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
        assert match, f"{sample} missing"
        return float(match.group(1))

    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "queue_seconds", "prefill_seconds",
                 "kv_transfer_seconds", "first_decode_step_seconds"):  # fmt: skip
        assert value(f"kimiserve:{name}_count") > 0, name
    assert value("kimiserve:vision_seconds_count") >= 0
    for name in ("prompt_tokens_total", "generation_tokens_total", "kv_transfer_bytes_total"):
        assert value(f"kimiserve:{name}") > 0, name
    assert value('kimiserve:requests_total{finish_reason="length"}') > 0
    assert value('kimiserve:pool_workers{role="decode",state="ready"}') == 1
    assert value('kimiserve:pool_workers{role="prefill",state="ready"}') == 1
    assert value('kimiserve:pool_free_pages{role="decode"}') > 0
