"""Constrained decoding below the API: `shared/grammar.py` states masking logits in
`shared/sampling.py`, and the prefill and decode engines generating JSON with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from decode_worker.colocated import ColocatedDriver
from decode_worker.engine import DecodeEngine, Request
from prefill_worker.engine import PrefillEngine
from shared.grammar import GrammarCache, GrammarError, GrammarState, check_spec, vocabulary
from shared.sampling import GrammarSpec, SamplingConfig, sample_batch, sample_one

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
SCHEMA_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
OBJECT_SPEC = GrammarSpec("json_object")
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def grammars(tok) -> GrammarCache:
    return GrammarCache(lambda: (vocabulary(tok, tok.vocab_size), tok.eos_token_ids))


def _id(tok, text: str) -> int:
    (token_id,) = tok.encode(text)
    return token_id


def _run(state: GrammarState, cfg: SamplingConfig, seed: int, max_steps: int = 400) -> list[int]:
    """Samples from random logits under `state` until a stop id; returns the token ids."""
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for step in range(max_steps):
        logits = torch.randn(state.vocab_size, generator=generator) * 3
        token = sample_one(logits, cfg, step, [], out, grammar=state).token_id
        assert state.accept(token), (step, token)
        out.append(token)
        if token in state.stop_ids:
            return out
    raise AssertionError(f"no stop token in {max_steps} steps")


def test_greedy_takes_the_best_allowed_token_with_raw_logprobs(tok, grammars):
    state = grammars.start(OBJECT_SPEC, tok.eos_token_ids)
    logits = torch.zeros(tok.vocab_size)
    logits[_id(tok, "x")] = 10.0  # the model's favourite cannot start a JSON object
    logits[_id(tok, "{")] = 5.0
    sampled = sample_one(logits, GREEDY, 0, grammar=state)
    assert sampled.token_id == _id(tok, "{")
    assert sampled.logprob == pytest.approx(float(logits.log_softmax(-1)[_id(tok, "{")]))
    assert sample_one(logits, GREEDY, 0).token_id == _id(tok, "x")  # unconstrained
    assert not state.accept(_id(tok, "x")) and state.accept(_id(tok, "{"))


@pytest.mark.parametrize("seed", range(6))
def test_random_sampling_follows_the_schema(tok, grammars, seed):
    stop = tok.token_id("<|im_end|>")
    state = grammars.start(SCHEMA_SPEC, [stop])
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=seed)
    out = _run(state, cfg, seed)
    assert out[-1] == stop and state.terminated
    value = json.loads(tok.decode(out[:-1]))
    jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("seed", range(3))
def test_json_object_is_an_object(tok, grammars, seed):
    state = grammars.start(OBJECT_SPEC, tok.eos_token_ids)
    out = _run(state, SamplingConfig(temperature=0.7, seed=seed), seed, max_steps=2000)
    assert isinstance(json.loads(tok.decode(out[:-1])), dict)


def test_reasoning_is_free_until_think_end(tok, grammars):
    """Thinking on: the mask leaves the logits alone, `</think>` included, until that token is
    emitted; from the next token on the grammar holds."""
    think_end = tok.token_id("</think>")
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA), reasoning_end_id=think_end)
    state = grammars.start(spec, tok.eos_token_ids)
    logits = torch.zeros(tok.vocab_size)
    logits[_id(tok, "x")] = 10.0
    for _ in range(3):  # reasoning: the unconstrained favourite wins
        assert state.mask(logits) is logits
        token = sample_one(logits, GREEDY, 0, grammar=state).token_id
        assert token == _id(tok, "x") and state.accept(token)
    forced = logits.clone()
    forced[think_end] = 50.0  # a logits test: the model closes its reasoning here
    assert sample_one(forced, GREEDY, 3, grammar=state).token_id == think_end
    assert state.accept(think_end) and not state.in_reasoning
    assert sample_one(logits, GREEDY, 4, grammar=state).token_id != _id(tok, "x")
    out = _run(state, SamplingConfig(temperature=1.0, seed=7), seed=7)
    jsonschema.validate(json.loads(tok.decode(out[:-1])), SCHEMA)


def test_thinking_off_constrains_from_the_first_token(tok, grammars):
    state = grammars.start(SCHEMA_SPEC, tok.eos_token_ids)
    logits = torch.zeros(tok.vocab_size)
    logits[tok.token_id("</think>")] = 50.0  # a special token never belongs to the JSON text
    assert sample_one(logits, GREEDY, 0, grammar=state).token_id == _id(tok, "{")


def test_after_the_grammar_ends_only_stop_ids_are_allowed(tok, grammars):
    stops = [tok.token_id("<|im_end|>"), 7]  # the request's own stop id 7 counts too
    state = grammars.start(GrammarSpec("json_schema", '{"enum": [1]}'), stops)
    assert state.accept(_id(tok, "1"))
    logits = torch.randn(tok.vocab_size)
    logits[stops] = -5.0
    allowed = torch.isfinite(state.mask(logits)).nonzero().flatten().tolist()
    assert sorted(allowed) == sorted(stops)  # the value is complete: only the end remains
    assert state.accept(7) and state.terminated
    assert torch.isfinite(state.mask(logits)).nonzero().flatten().tolist() == sorted(stops)
    assert not state.accept(_id(tok, "1"))


@pytest.mark.parametrize("bounds", [{"maxLength": 4}, {"minLength": 1}, {}])
def test_strings_never_take_raw_control_characters(tok, grammars, bounds):
    """JSON strings take no raw U+0000-U+001F, length-bounded ones included (xgrammar's own
    bounded-string rule would admit them; `shared.grammar` replaces it)."""
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", **bounds}},
        "required": ["s"],
    }
    state = grammars.start(GrammarSpec("json_schema", json.dumps(schema)), tok.eos_token_ids)
    for token in tok.encode('{"s":"a'):
        assert state.accept(token)
    allowed = torch.isfinite(state.mask(torch.zeros(tok.vocab_size)))
    # tokens with a control byte before any closing quote (`"\n` ends the string, then a blank)
    controls = [
        i
        for i in range(tok.num_base_tokens)
        if any(b < 0x20 for b in tok.token_bytes(i).split(b'"')[0])
    ]
    assert len(controls) > 30 and not allowed[controls].any()
    assert allowed[_id(tok, "b")] and allowed[_id(tok, '"')]


def test_a_grammar_with_no_way_on_ends_the_output():
    """A vocabulary without digits or "-" cannot start an integer: the state offers only the
    stop id, so random sampling ends the request instead of drawing from nothing (which would
    fail every request of the decode batch)."""
    vocab = [b"" if chr(i) in "-0123456789" else bytes([i]) for i in range(256)] + [b""]
    cache = GrammarCache(lambda: (vocab, [256]))
    state = cache.start(GrammarSpec("json_schema", '{"type": "integer"}'), [256])
    masked = state.mask(torch.zeros(len(vocab)))
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [256]
    sampled = sample_one(torch.randn(len(vocab)), SamplingConfig(temperature=1.0, seed=0), 0,
                         grammar=state)  # fmt: skip
    assert sampled.token_id == 256 and state.accept(256)


def test_sample_batch_masks_only_rows_with_a_grammar(tok, grammars):
    logits = torch.zeros(3, tok.vocab_size)
    logits[:, _id(tok, "x")] = 10.0
    logits[:, _id(tok, "{")] = 5.0
    configs = [GREEDY, GREEDY, SamplingConfig(temperature=1.0, seed=1)]
    args = (logits, configs, [0, 0, 0], [[], [], []], [[], [], []])
    plain = sample_batch(*args)
    assert sample_batch(*args, [None, None, None]) == plain
    states = [None, grammars.start(OBJECT_SPEC, tok.eos_token_ids), None]
    mixed = sample_batch(*args, states)
    assert [s.token_id for s in mixed] == [_id(tok, "x"), _id(tok, "{"), plain[2].token_id]
    assert mixed[1].logprob == pytest.approx(float(logits[1].log_softmax(-1)[_id(tok, "{")]))


def test_unconstrained_serving_never_loads_xgrammar():
    """Workers import xgrammar on their first constrained request only: the servers' modules and
    a batch without grammars leave it unloaded."""
    code = (
        "import sys, torch\n"
        "import decode_worker.colocated_server, decode_worker.server, prefill_worker.server\n"
        "from shared.sampling import SamplingConfig, sample_batch\n"
        "cfgs = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, seed=1)]\n"
        "sample_batch(torch.randn(2, 64), cfgs, [0, 0], [[], []], [[], []], [None, None])\n"
        "print('xgrammar' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True)  # fmt: skip
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_cache_keeps_the_most_recent_specs(tok):
    cache = GrammarCache(lambda: (vocabulary(tok, tok.vocab_size), tok.eos_token_ids), 2)
    specs = [GrammarSpec("json_schema", json.dumps({"enum": [i]})) for i in range(3)]
    first = cache.compile(specs[0])
    cache.compile(specs[1])
    assert cache.compile(specs[0]) is first  # a hit, and now the most recent
    cache.compile(specs[2])  # evicts specs[1]
    assert len(cache) == 2
    assert cache.compile(specs[0]) is first


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ('{"type": "wizard"}', 'Unsupported type "wizard"'),
        ('{"$ref": "#/$defs/missing"}', "missing"),
        ('{"type": "string", "pattern": "[a-"}', "Regex parsing error"),
    ],
)
def test_invalid_schemas_raise_grammar_error(tok, grammars, schema, reason):
    with pytest.raises(GrammarError, match=reason) as error:
        check_spec("json_schema", schema)
    assert ".cc:" not in str(error.value)  # xgrammar's C++ prefix is cut
    with pytest.raises(GrammarError):
        grammars.start(GrammarSpec("json_schema", schema), tok.eos_token_ids)
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        check_spec("regex", "")


def test_engines_generate_schema_json_and_free_their_pages(tiny_checkpoint, tok):
    """Prefill (first token) and decode (the rest) each mask with their own matcher; the decode
    side replays the prefill's first token. Every page is free afterwards."""
    from shared.chat_template import render_chat
    from shared.model.loader import load_text_model
    from shared.runner import ModelRunner

    model = load_text_model(tiny_checkpoint)
    cache = GrammarCache.for_model(tiny_checkpoint, model.config.vocab_size)
    prefill, decode = ModelRunner(model, 64, 16), ModelRunner(model, 64, 16)
    driver = ColocatedDriver(PrefillEngine(prefill), DecodeEngine(decode))
    template = (tiny_checkpoint / "chat_template.jinja").read_text()
    text = render_chat(template, [{"role": "user", "content": "JSON please"}],
                       add_generation_prompt=True, thinking=False)  # fmt: skip
    assert text.endswith("<think></think>")
    prompt = tok.encode(text)
    stops = frozenset(tok.eos_token_ids)
    requests = []
    for i, cfg in enumerate([GREEDY, SamplingConfig(temperature=1.0, seed=1)]):
        cfg = SamplingConfig(cfg.temperature, seed=cfg.seed, grammar=SCHEMA_SPEC)
        request = Request(f"r{i}", prompt, cfg, 300, stops, [])
        request.grammar = cache.start(SCHEMA_SPEC, sorted(stops))
        requests.append(request)
        driver.submit(request)
    with torch.no_grad():
        driver.run_until_idle()
    for request in requests:
        assert request.output_ids[-1] in stops, request.output_ids
        jsonschema.validate(json.loads(tok.decode(request.output_ids[:-1])), SCHEMA)
    assert prefill.allocator.num_free == 64 and decode.allocator.num_free == 64
